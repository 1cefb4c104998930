"""Rejected-attempt counters in the nftables tables, hot and retired.

Each rejected attempt bumps a counter element (interface . port) of the
reason's set `cnt_<reason>`. An interface's elements stay in the kernel as
long as the interface exists, so a host whose 1,000 VMs were each blocked
once lists 1,000 counters at every detection step and scrape, long after
they stopped changing (libnftables: ~5 ms a listing).

Retiring moves an idle interface's elements, value and all, to
`old_<reason>` in one transaction; readers add both, so every count stays
what it was and never goes down. The agent keeps the retired values in
memory (they change only through retire() and forget()), so the sets listed
on every read are the hot ones. An attempt rejected between the read and
the retirement of an interface idle for that long would be missed by one
count; the next attempt recreates the hot element from zero.

The retired values live in the kernel, beside the hot ones, so a restarted
agent reads the same totals (and a reboot clears both, as it clears the hot).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from smtpguard import logs
from smtpguard.enforce import render
from smtpguard.errors import EnforcerError

# An element key written in nft's text syntax (JSON cannot set a counter's
# value): only names that need no escaping are retired.
_SAFE_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")

Key = tuple[str, str, str, int]  # family, reason, interface, port


@dataclass(frozen=True)
class BlockedCount:
    family: str
    reason: str
    ifname: str
    port: int
    packets: int

    @property
    def key(self) -> Key:
        return (self.family, self.reason, self.ifname, self.port)


def hot_set(reason: str) -> str:
    return f"cnt_{reason}"


def cold_set(reason: str) -> str:
    return f"old_{reason}"


def parse(family: str, reason: str, listed: Mapping[str, Any]) -> list[BlockedCount]:
    """A listed counter set's elements (libnftables JSON) as counts."""
    out = []
    for elem in listed.get("elem", []):
        e = elem.get("elem", elem) if isinstance(elem, dict) else elem
        val = e["val"]["concat"] if isinstance(e, dict) and "val" in e else e["concat"]
        packets = e.get("counter", {}).get("packets", 0) if isinstance(e, dict) else 0
        out.append(BlockedCount(family, reason, str(val[0]), int(val[1]), int(packets)))
    return out


def packets(listed: Mapping[str, Any]) -> int:
    """The sum of a listed set's element counters (the per-port overflow set)."""
    return sum(int(e["elem"].get("counter", {}).get("packets", 0))
               for e in listed.get("elem", []) if isinstance(e, dict) and "elem" in e)


def merged(hot: Iterable[BlockedCount], cold: Mapping[Key, int]) -> list[BlockedCount]:
    """Each key's hot count plus what was retired of it."""
    out = {c.key: c.packets for c in hot}
    for k, n in cold.items():
        out[k] = out.get(k, 0) + n
    return [BlockedCount(*k, n) for k, n in sorted(out.items())]


def _elem(ifname: str, port: int) -> str:
    return f'"{ifname}" . {port}'


def retire_script(hot: Iterable[BlockedCount], cold: Mapping[Key, int],
                  ifnames: Iterable[str]) -> tuple[list[str], dict[Key, int]]:
    """The nft commands (one transaction) that move these interfaces' hot
    elements to the retired sets, and the retired values after it."""
    wanted = {n for n in ifnames if _SAFE_IFNAME.match(n)}
    after = dict(cold)
    script = []
    for c in hot:
        if c.ifname not in wanted:
            continue
        table = f"{c.family} {render.TABLE}"
        key = _elem(c.ifname, c.port)
        script.append(f"delete element {table} {hot_set(c.reason)} {{ {key} }}")
        was = after.get(c.key)
        if was is not None:
            script.append(f"delete element {table} {cold_set(c.reason)} {{ {key} }}")
        after[c.key] = (was or 0) + c.packets
        script.append(f"add element {table} {cold_set(c.reason)} "
                      f"{{ {key} counter packets {after[c.key]} bytes 0 }}")
    return script, after


def forget_commands(cold: Mapping[Key, int], gone: set[str]) -> list[dict[str, Any]]:
    """JSON commands deleting the retired elements of interfaces that are gone."""
    return [{"delete": {"element": {
        "family": fam, "table": render.TABLE, "name": cold_set(reason),
        "elem": [{"concat": [ifname, port]}]}}}
        for (fam, reason, ifname, port) in sorted(cold) if ifname in gone]


class Counters:
    """The enforcer's rejection counters: hot sets read on every call, the
    retired values from memory (read from the kernel once, then kept by
    retire() and forget()). `lock` is held across each read of both and
    across a retirement, so no reader ever sees an element in both or in
    neither (a count that goes down)."""

    def __init__(self, list_set: Callable[..., dict[str, Any]],
                 text: Callable[[str], tuple[int, str]],
                 json_cmds: Callable[[list[dict[str, Any]], str], None]) -> None:
        self._list_set = list_set  # (family, name, scrape=...) -> the listed set
        self._text = text
        self._json = json_cmds
        self.lock = threading.RLock()
        self._cold: dict[Key, int] | None = None

    def invalidate(self) -> None:
        with self.lock:
            self._cold = None

    def hot(self) -> list[BlockedCount]:
        return [c for fam in render.FAMILIES for reason in render.REASONS
                for c in parse(fam, reason, self._list_set(fam, hot_set(reason)))]

    def retired(self) -> dict[Key, int]:
        with self.lock:
            if self._cold is None:
                self._cold = {c.key: c.packets for fam in render.FAMILIES
                              for reason in render.REASONS
                              for c in parse(fam, reason, self._list_set(
                                  fam, cold_set(reason), scrape=True))}
            return dict(self._cold)

    def blocked(self) -> list[BlockedCount]:
        with self.lock:
            return merged(self.hot(), self.retired())

    def retire(self, ifnames: Iterable[str]) -> int:
        """Move these interfaces' hot elements to the retired sets in one
        transaction; how many moved."""
        wanted = set(ifnames)
        if not wanted:
            return 0
        with self.lock:
            hot = [c for c in self.hot() if c.ifname in wanted]
            script, after = retire_script(hot, self.retired(), wanted)
            if not script:
                return 0
            rc, err = self._text("\n".join(script))
            if rc != 0:
                self._cold = None  # read again from the kernel
                raise EnforcerError(f"retiring idle counters: {err or rc}")
            self._cold = after
        moved = sum(1 for line in script if line.startswith("add "))
        logs.get().debug("nft.counters_retired", elements=moved)
        return moved

    def forget(self, ifnames: Iterable[str]) -> None:
        """Delete the counters, hot and retired, of interfaces that are gone."""
        gone = set(ifnames)
        if not gone:
            return
        with self.lock:
            cold = self.retired()
            cmds = [{"delete": {"element": {
                "family": c.family, "table": render.TABLE, "name": hot_set(c.reason),
                "elem": [{"concat": [c.ifname, c.port]}]}}}
                for c in self.hot() if c.ifname in gone]
            cmds += forget_commands(cold, gone)
            if cmds:
                self._json(cmds, "forgetting interfaces")
            self._cold = {k: n for k, n in cold.items() if k[2] not in gone}
