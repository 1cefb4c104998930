"""What this host watches in etcd: the keys of the VMs it runs (or holds a
decision for) and the prefixes of the tenants it hosts, never the fleet's
whole prefix. Each one is read once (its current value and the store's
revision), then watched from the next revision on etcd's gRPC API, all on one
stream (etcdgrpc.py). When the stream ends (etcd restarted, a partition) every
watch resumes from the last revision it was known at, so etcd replays what
happened meanwhile; one whose revision was compacted away is read again.

    set(group, {key: is_prefix})   what a group (vms, tenants) wants now
    read_now(key)                  a read on the caller's thread, for a VM that
                                   arrives: its record before its first SYN
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from smtpguard import logs
from smtpguard.fleet.etcd import EtcdCompacted, EtcdError, Kv
from smtpguard.fleet.etcdgrpc import GrpcEtcd

BACKOFF_MAX = 5.0
HOLD = 60.0  # seconds an arrival's read is kept for the watch the agent asks next


class Interest:
    def __init__(self, grpc: GrpcEtcd, on_kv: Callable[[Kv], None],
                 log: Any = None, on_delete: Callable[[Kv], None] | None = None,
                 on_read: Callable[[str], None] | None = None) -> None:
        self.grpc = grpc
        self.on_kv = on_kv  # each PUT read or watched, on the reader's thread
        self.on_delete = on_delete  # each DELETE watched (a lease's end, a removal)
        self.on_read = on_read  # a key read whole (first watched, or compacted)
        self.log = log or logs.get()
        self.groups: dict[str, dict[str, bool]] = {}
        self.upto: dict[str, int] = {}  # key -> the revision it is known complete at
        self.active: dict[str, Any] = {}  # key -> its watch's handle
        self._live: dict[str, object] = {}  # key -> the token of its watch now
        self._held: dict[str, float] = {}  # key read on arrival -> kept until (monotonic)
        self.reads = 0  # keys read (arrivals, first watches, compactions)
        self.events = 0  # changes delivered on the watches (this host's own included)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._broken = False  # the stream ended: every watch resumes
        self._thread = threading.Thread(target=self._run, name="fleet-interest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.grpc.close()

    @property
    def streaming(self) -> bool:
        """Every key wanted is watched now."""
        with self._lock:
            return not self._broken and set(self._wanted()) <= set(self.active)

    def wanted(self) -> dict[str, bool]:
        with self._lock:
            return self._wanted()

    def _wanted(self) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for items in self.groups.values():
            out.update(items)
        return out

    def set(self, group: str, items: dict[str, bool]) -> None:
        with self._lock:
            if self.groups.get(group) == items:
                return
            self.groups[group] = dict(items)
        self._wake.set()

    def read_now(self, key: str, timeout: float) -> list[Kv]:
        """The key read now (an arriving VM's record); its watch starts after."""
        rev, kvs = self.grpc.read(key, timeout=timeout, wait=True)
        with self._lock:
            self.reads += 1
            if key not in self.active:
                self.upto[key] = max(self.upto.get(key, 0), rev)
                # Not wanted yet (the agent asks for its watch next): kept
                # from the pruning of keys no longer wanted meanwhile.
                self._held[key] = time.monotonic() + HOLD
        return kvs

    # -- the thread ------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._reconcile()
                backoff = 0.5
                self._wake.wait(5.0)
            except EtcdError as exc:
                self.log.debug("fleet.interest_failed", error=str(exc))
                self._wake.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as exc:  # a bug here must not end the thread
                self.log.error("fleet.interest_failed", error=str(exc))
                self.log.debug("fleet.interest_failed", exc_info=True)
                self._wake.wait(BACKOFF_MAX)

    def _reconcile(self) -> None:
        # Never a call to etcd under the lock: the watches' events take it on
        # the loop's thread, which that call would wait for.
        with self._lock:
            drop = []
            if self._broken:
                self._broken = False
                drop += list(self.active.values())
                self.active.clear()
                self._live.clear()
            want = self._wanted()
            for k in [k for k in self.active if k not in want]:
                drop.append(self.active.pop(k))
                self._live.pop(k, None)
            now = time.monotonic()
            self._held = {k: t for k, t in self._held.items() if t > now and k not in want}
            for k in [k for k in self.upto if k not in want and k not in self._held]:
                del self.upto[k]
            todo = [(k, p) for k, p in want.items() if k not in self.active]
        for h in drop:
            self.grpc.cancel(h)
        for key, prefix in todo:
            if self._stop.is_set():
                return
            with self._lock:
                start = self.upto.get(key)
            if start is None:  # first watched, or compacted: read it whole
                rev, kvs = self.grpc.read(key, prefix)
                with self._lock:
                    self.reads += 1
                for kv in kvs:
                    self.on_kv(kv)
                if self.on_read is not None:
                    self.on_read(key)
                start = rev
                with self._lock:
                    self.upto[key] = max(self.upto.get(key, 0), rev)
                    start = self.upto[key]
            tok = object()
            with self._lock:
                self._live[key] = tok  # its events count from the first one
            handle = self.grpc.watch(key, prefix, start + 1, self._event(key, tok),
                                     self._ended(key, tok))
            with self._lock:
                keep = self._live.get(key) is tok and key in self._wanted()
                if keep:
                    self.active[key] = handle
            if not keep:
                self.grpc.cancel(handle)

    def _event(self, key: str, tok: object) -> Callable[[str, Kv], None]:
        def event(kind: str, kv: Kv) -> None:
            with self._lock:
                if self._live.get(key) is not tok:
                    return  # a cancelled watch's last events
                self.upto[key] = max(self.upto.get(key, 0), kv.mod_revision)
                self.events += 1
            if kind == "PUT":
                self.on_kv(kv)
            elif self.on_delete is not None:
                self.on_delete(kv)
        return event

    def _ended(self, key: str, tok: object) -> Callable[[EtcdError], None]:
        def ended(exc: EtcdError) -> None:
            if self._stop.is_set():
                return
            with self._lock:
                if self._live.get(key) is not tok:
                    return
                del self._live[key]
                if isinstance(exc, EtcdCompacted):
                    self.log.warning("fleet.watch_compacted", key=key, error=str(exc))
                    self.active.pop(key, None)
                    self.upto.pop(key, None)  # read again
                else:
                    self.log.debug("fleet.watch_ended", key=key, error=str(exc))
                    self._broken = True
                    self.active.pop(key, None)
            self._wake.set()
        return ended
