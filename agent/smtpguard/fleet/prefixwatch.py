"""FleetSync's watches of a whole prefix on the JSON gateway: the policy
prefix's (always), and the fleet prefix's in the fallback design (no gRPC
client: every change of the fleet, as before issue 27). Each resumes from the
last revision seen whenever it ends; a compacted revision is read again in
full (FleetSync._read)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from smtpguard.fleet.etcd import EtcdCompacted, EtcdError, Kv
from smtpguard.policy.model import Fleet as FleetPolicy

BACKOFF_MAX = 5.0
WATCH_IDLE = 30.0  # a watch stream with nothing for this long is resumed (a partition shows)


class PrefixWatches:
    cfg: FleetPolicy
    etcd: Any  # etcd.Etcd (the gateway) here; FleetSync may hold a GrpcEtcd
    log: Any
    rev: int
    tenant_rev: int
    lease: int
    seen: dict[str, int]
    watching: bool
    policy_watching: bool
    _resync: bool
    _policy_dirty: bool
    _policy_rev: int
    _read_lock: threading.Lock
    _wake: threading.Event
    _stop: threading.Event

    def _take(self, kv: Kv) -> Any: ...
    def _tenant(self, kv: Kv) -> None: ...

    # -- the watches -------------------------------------------------------------
    def _watch_records(self) -> None:
        """Records and tenant counts as they change, from the revision after
        the last one read (the first read is _connect's)."""
        def created() -> None:
            self.watching = True

        def events(rev: int, evs: list[tuple[str, Kv]]) -> None:
            with self._read_lock:
                for kind, kv in evs:
                    if kind != "PUT":
                        continue  # a record or count gone with its lease: nothing to undo
                    if kv.key.startswith(vms):
                        if kv.mod_revision > self.seen.get(kv.key, 0):
                            self._take(kv)
                    elif kv.key.startswith(tenants):
                        self._tenant(kv)
                self.rev = max(self.rev, rev)
                self.tenant_rev = max(self.tenant_rev, rev)

        vms, tenants = f"{self.cfg.prefix}/vms/", f"{self.cfg.prefix}/tenants/"
        self._watch(f"{self.cfg.prefix}/", lambda: self.rev, created, events, "watching")

    def _watch_policy(self) -> None:
        def created() -> None:
            self.policy_watching = True

        def events(rev: int, evs: list[tuple[str, Kv]]) -> None:
            self._policy_rev = max(self._policy_rev, rev)
            self._policy_dirty = True
            self._wake.set()

        assert self.cfg.policy_prefix is not None
        self._watch(self.cfg.policy_prefix + "/", lambda: self._policy_rev, created, events,
                    "policy_watching")

    def _watch(self, prefix: str, rev: Callable[[], int], created: Callable[[], None],
               events: Callable[[int, list[tuple[str, Kv]]], None], flag: str) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            if not self.lease or not rev():
                self._stop.wait(0.1)  # not connected yet: _connect reads first
                continue
            try:
                self.etcd.watch(prefix, rev() + 1, events, created, self._stop, WATCH_IDLE)
                backoff = 0.5
            except EtcdCompacted as exc:
                self.log.warning("fleet.watch_compacted", prefix=prefix, error=str(exc))
                with self._read_lock:
                    self._resync = True
                self._policy_dirty = True
            except EtcdError as exc:
                self.log.debug("fleet.watch_ended", prefix=prefix, error=str(exc))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as exc:  # a bug here must not end the thread
                self.log.error("fleet.watch_failed", error=str(exc))
                self.log.debug("fleet.watch_failed", exc_info=True)
                self._stop.wait(BACKOFF_MAX)
            finally:
                setattr(self, flag, False)
                self._wake.set()  # the loop polls until the watch is back
