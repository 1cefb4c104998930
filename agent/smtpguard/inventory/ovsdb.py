"""OVSDB's wire (RFC 7047): JSON-RPC messages that follow each other on the
socket with no framing, and the datum encodings of maps and row references.
Pure; inventory/ovs.py speaks it."""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import SmtpguardError


class OvsdbError(SmtpguardError):
    """ovsdb-server refused a request or sent what is not OVSDB's JSON-RPC."""


class JsonStream:
    """Splits a byte stream into JSON texts (OVSDB's JSON-RPC has no framing:
    messages follow each other), in linear time however a message is cut."""

    _SPECIAL = re.compile(rb'["{}\[\]]')
    _IN_STRING = re.compile(rb'["\\]')

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # scanned up to here
        self._depth = 0
        self._in_string = False

    def feed(self, data: bytes) -> list[Any]:
        """The messages completed by data, in order."""
        self._buf += data
        out: list[Any] = []
        buf, i = self._buf, self._pos
        while True:
            if self._in_string:
                m = self._IN_STRING.search(buf, i)
                if m is None:
                    i = len(buf)
                    break
                if buf[m.start()] == 0x5C:  # backslash: skip what it escapes
                    if m.end() >= len(buf):
                        i = m.start()  # see the escaped byte with the next chunk
                        break
                    i = m.end() + 1
                    continue
                self._in_string, i = False, m.end()
                continue
            m = self._SPECIAL.search(buf, i)
            if m is None:
                i = len(buf)
                break
            if self._depth == 0 and buf[i:m.start()].strip():
                raise OvsdbError(f"not JSON-RPC: {bytes(buf[i:m.start()])[:80]!r}")
            c, i = buf[m.start()], m.end()
            if c == 0x22:
                self._in_string = True
            elif c in (0x7B, 0x5B):
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth < 0:
                    raise OvsdbError("not JSON-RPC: unbalanced brackets")
                if self._depth == 0:
                    try:
                        out.append(json.loads(buf[:i]))
                    except ValueError as exc:
                        raise OvsdbError(f"not JSON-RPC: {exc}") from exc
                    del buf[:i]
                    i = 0
        self._pos = i
        return out


def decode_map(datum: Any) -> dict[str, str]:
    """An OVSDB map datum (["map", [[k, v], ...]]) as a dict of strings."""
    if isinstance(datum, list) and len(datum) == 2 and datum[0] == "map":
        return {str(k): str(v) for k, v in datum[1]}
    return {}


def decode_uuids(datum: Any) -> set[str]:
    """An OVSDB set of row references: ["uuid", U] or ["set", [["uuid", U], ...]]."""
    if not isinstance(datum, list) or len(datum) != 2:
        return set()
    if datum[0] == "uuid":
        return {str(datum[1])}
    if datum[0] == "set":
        return {str(a[1]) for a in datum[1] if isinstance(a, list) and a[:1] == ["uuid"]}
    return set()
