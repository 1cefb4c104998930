"""The agent's side of the fleet: the records it decides go out (FleetSync
publishes them), the other hosts' come in and are applied on the agent's
loop, like an operator's command (Responder.adopt)."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smtpguard import logs
from smtpguard.fleet.collector import FleetCollector
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import FleetSync
from smtpguard.fleet.tenants import TenantBudgets
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.model import Fleet as FleetPolicy
from smtpguard.respond.responder import Responder


class FleetLink:
    def __init__(self, cfg: FleetPolicy, responder: Responder,
                 wake: Callable[[], None],
                 ifaces: Callable[[], Mapping[int, VmIface]],
                 state_dir: Path | None = None,
                 reload: Callable[[], None] | None = None) -> None:
        self.responder = responder
        self.reload = reload
        # The fleet's policy documents last applied, kept in the state
        # directory: a start while etcd is away goes on with them, not without.
        self.policy_file = state_dir / "fleet-policy.json" if state_dir else None
        self._policy: tuple[list[tuple[str, str]], int] = ([], 0)
        self._policy_lock = threading.Lock()
        if self.policy_file is not None and cfg.policy_prefix is not None:
            try:
                saved = json.loads(self.policy_file.read_text())
                self._policy = ([(n, t) for n, t in saved["docs"]], int(saved["revision"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        self.wake = wake
        self.host = cfg.host or socket.gethostname()
        self.log = logs.get()
        self.inbox: queue.Queue[FleetRecord] = queue.Queue()
        det = responder.detector
        now = time.time()
        # What the store holds in force (or under an operator's immunity)
        # goes out at the first connection unless the fleet knows later.
        own = [FleetRecord.of(rec, self.host, det.blocks_at(rec.vm))
               for rec in list(det.records.values())
               if rec.state != "ok" or (rec.manual_until or 0) > now]
        self.sync = FleetSync(cfg, self._incoming, own, self.host,
                              policy=self._policy_in if cfg.policy_prefix else None)
        self.sync.policy_revision = self._policy[1]
        det.on_commit = lambda rec: self.sync.publish(
            FleetRecord.of(rec, self.host, det.blocks_at(rec.vm)))
        self.ifaces = ifaces
        self.budgets = (TenantBudgets(cfg.tenant_budget, self.sync, det)
                        if cfg.tenant_budget is not None else None)
        self.log.info("fleet.started", host=self.host, endpoints=list(cfg.endpoints),
                      prefix=cfg.prefix, records=len(own))

    def policy_docs(self) -> tuple[list[tuple[str, str]], int]:
        """The fleet's policy documents and their etcd revision ([], 0: none)."""
        with self._policy_lock:
            return self._policy

    def accepted(self, docs: list[tuple[str, str]], revision: int) -> None:
        """The agent applied these documents: kept for a start without etcd."""
        if self.policy_file is not None and revision:
            tmp = self.policy_file.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps({"docs": docs, "revision": revision}))
                tmp.replace(self.policy_file)
            except OSError as exc:
                self.log.warning("fleet.policy_unsaved", error=str(exc))

    def _policy_in(self, docs: list[tuple[str, str]], revision: int) -> None:
        with self._policy_lock:
            self._policy = (docs, revision)
        self.log.info("fleet.policy_changed", documents=[n for n, _ in docs],
                      revision=revision)
        if self.reload is not None:
            self.reload()

    def _incoming(self, rec: FleetRecord) -> None:  # on the fleet's thread
        self.inbox.put(rec)
        self.wake()

    def start(self) -> None:
        self.sync.start()

    def stop(self) -> None:
        self.sync.stop()

    def collector(self) -> Any:
        return FleetCollector(self.sync)

    def serve(self) -> None:
        """On the agent's loop: apply what came in; the tenants' budgets."""
        if self.budgets is not None:
            try:
                self.budgets.step(self.ifaces())
            except Exception as exc:
                self.log.error("fleet.budget_failed", error=str(exc))
        while True:
            try:
                rec = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self.responder.adopt(rec, self.host)
            except Exception as exc:
                self.log.error("fleet.adopt_failed", vm=rec.vm, error=str(exc))
