"""The few etcd operations the fleet needs, on etcd3gw (etcd's v3 JSON
gateway), over the policy's endpoints in turn: a revisioned range, a
compare-and-swap put, leases. Every failure is EtcdError, counted per op."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from smtpguard.errors import SmtpguardError
from smtpguard.policy.model import Fleet as FleetPolicy


class EtcdError(SmtpguardError):
    pass


class EtcdCompacted(EtcdError):
    """A watch's start revision is gone from etcd's history: read everything."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd watch: revision compacted (history starts at {compact_revision})")
        self.compact_revision = compact_revision


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def prefix_end(prefix: str) -> str:
    """The end of the range of keys that start with `prefix`."""
    b = prefix.encode()
    return (b[:-1] + bytes([b[-1] + 1])).decode()


@dataclass(frozen=True)
class Kv:
    key: str
    value: bytes
    mod_revision: int
    lease: int


class Etcd:
    def __init__(self, cfg: FleetPolicy) -> None:
        import etcd3gw

        self.cfg = cfg
        self.clients = []
        for url in cfg.endpoints:
            u = urlsplit(url)
            tls = cfg.tls
            self.clients.append(etcd3gw.client(
                host=u.hostname or "localhost", port=u.port or 2379, protocol=u.scheme,
                ca_cert=tls.ca if tls else None, cert_key=tls.key if tls else None,
                cert_cert=tls.cert if tls else None, timeout=cfg.timeout, api_path="/v3/"))
        self.current = 0
        self.errors: Counter[str] = Counter()
        self.up = False
        self._watches: set[Any] = set()  # open watch responses, for close_watches()
        self._watch_lock = threading.Lock()

    def _post(self, op: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for i in range(len(self.clients)):
            c = self.clients[(self.current + i) % len(self.clients)]
            try:
                reply: dict[str, Any] = c.post(c.get_url(path), json=body)
            except Exception as exc:  # requests' and etcd3gw's own, alike
                last = exc
                continue
            self.current = (self.current + i) % len(self.clients)
            self.up = True
            return reply
        self.errors[op] += 1
        self.up = False
        # etcd3gw's errors keep their text in detail_text (str() is empty).
        raise EtcdError(f"etcd {op}: {getattr(last, 'detail_text', None) or repr(last)}")

    def range(self, prefix: str, min_mod_revision: int = 0) -> tuple[int, list[Kv]]:
        """(the store's revision, every key under prefix changed after
        min_mod_revision)."""
        body: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        if min_mod_revision:
            body["min_mod_revision"] = min_mod_revision
        reply = self._post("range", "/kv/range", body)
        kvs = [_kv(k) for k in reply.get("kvs", [])]
        return int(reply["header"]["revision"]), kvs

    def put_if(self, key: str, value: str, lease: int, mod_revision: int
               ) -> tuple[bool, int, Kv | None]:
        """Put only if the key's mod_revision is still `mod_revision` (0: the
        key is absent). (done, the revision after, the key as it is if not)."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = lease
        reply = self._post("put", "/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "MOD",
                         "mod_revision": mod_revision}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": _b64(key)}}]})
        rev = int(reply["header"]["revision"])
        if reply.get("succeeded"):
            return True, rev, None
        kvs = reply["responses"][0]["response_range"].get("kvs", [])
        now = (Kv(key, _unb64(kvs[0].get("value", "")), int(kvs[0]["mod_revision"]),
                  int(kvs[0].get("lease", 0))) if kvs else None)
        return False, rev, now

    def put(self, key: str, value: str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        return int(self._post("put", "/kv/put", body)["header"]["revision"])

    def grant(self, ttl: float) -> int:
        return int(self._post("lease", "/lease/grant", {"TTL": max(int(ttl), 1)})["ID"])

    def keepalive(self, lease: int) -> bool:
        """False when the lease is gone (expired while we could not reach etcd)."""
        reply = self._post("lease", "/lease/keepalive", {"ID": lease})
        return int(reply.get("result", {}).get("TTL", -1)) > 0

    def watch(self, prefix: str, start_revision: int,
              on_events: Callable[[int, list[tuple[str, Kv]]], None],
              on_created: Callable[[], None], stop: threading.Event,
              idle: float = 30.0) -> None:
        """Stream every change under prefix from start_revision on, until the
        stream ends (EtcdError; EtcdCompacted when that revision is gone) or
        stop is set. on_events(revision, [(PUT or DELETE, kv)]) per response.
        A stream quiet for `idle` seconds ends too (etcd sends nothing on a
        quiet watch; a partition must not go unnoticed): the caller resumes
        from the last revision it had, which loses nothing."""
        c = self.clients[self.current]
        body: dict[str, Any] = {"create_request": {
            "key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
            "start_revision": start_revision}}
        try:
            resp = c.session.post(c.get_url("/watch"), json=body, stream=True,
                                  timeout=(self.cfg.timeout, idle))
            resp.raise_for_status()
        except Exception as exc:
            self.errors["watch"] += 1
            raise EtcdError(f"etcd watch: {exc!r}") from exc
        with self._watch_lock:
            self._watches.add(resp)
        try:
            for line in resp.iter_lines():
                if stop.is_set():
                    return
                if not line.strip():
                    continue
                msg = json.loads(line)
                result = msg.get("result", {})
                if result.get("canceled") or "error" in msg:
                    compact = int(result.get("compact_revision", 0))
                    if compact:
                        raise EtcdCompacted(compact)
                    raise EtcdError(f"etcd watch canceled: {result.get('cancel_reason') or line!r}")
                if result.get("created"):
                    on_created()
                events = [(e.get("type", "PUT"), _kv(e["kv"])) for e in result.get("events", [])]
                if events:
                    on_events(int(result["header"]["revision"]), events)
        except EtcdError:
            self.errors["watch"] += 1
            raise
        except Exception as exc:  # requests' read timeout, a reset, etcd going away
            if stop.is_set() or _quiet(exc):
                return
            self.errors["watch"] += 1
            raise EtcdError(f"etcd watch ended: {exc!r}") from exc
        finally:
            with self._watch_lock:
                self._watches.discard(resp)
            resp.close()
        if not stop.is_set():
            self.errors["watch"] += 1
            raise EtcdError("etcd watch: the stream ended")

    def close_watches(self) -> None:
        """End every watch stream now (the watching threads see it at once)."""
        with self._watch_lock:
            for resp in list(self._watches):
                sock = _socket_of(resp)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read
                resp.close()


def _quiet(exc: BaseException) -> bool:
    """A watch stream that only timed out reading (nothing changed for
    `idle` seconds), as requests reports it."""
    import requests
    from urllib3.exceptions import ReadTimeoutError

    if isinstance(exc, requests.exceptions.Timeout):
        return True
    inner = exc.args[0] if exc.args else None
    return isinstance(exc, requests.exceptions.ConnectionError) and isinstance(
        inner, ReadTimeoutError)


def _socket_of(resp: Any) -> socket.socket | None:
    """The socket under a streaming requests response (urllib3 keeps it on
    the http.client response it wraps)."""
    try:
        sock = resp.raw._fp.fp.raw._sock
    except AttributeError:
        return None
    return sock if isinstance(sock, socket.socket) else None


def _kv(k: dict[str, Any]) -> Kv:
    return Kv(_unb64(k["key"]).decode(), _unb64(k.get("value", "")),
              int(k.get("mod_revision", 0)), int(k.get("lease", 0)))
