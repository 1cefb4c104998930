"""The agent's side of the fleet: the records it decides go out (FleetSync
publishes them), the other hosts' come in and are applied on the agent's
loop, like an operator's command (Responder.adopt).

What comes in is what concerns this host (its interest): the records of the
VMs it runs, or holds a decision for (a stopped VM's block), and the counts
of the tenants it hosts. A VM that arrives (libvirt's hook, before QEMU runs;
elsewhere its interface's first appearance) has its record read at once, on
the agent's loop, before its interface is enforced: its block is held the way
a stopped VM's is, for its first SYN."""

from __future__ import annotations

import importlib.util
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from smtpguard import logs
from smtpguard.fleet.collector import FleetCollector
from smtpguard.fleet.etcd import EtcdError
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import FleetSync
from smtpguard.fleet.tenants import TenantBudgets
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.model import Fleet as FleetPolicy
from smtpguard.respond.responder import Responder

ARRIVAL_READ = 1.0  # seconds at most an arriving VM's read holds the agent's loop
EXPECT = 120.0  # seconds a VM announced by libvirt's hook is of interest before its taps
INTEREST_EVERY = 0.5  # seconds between recomputing what this host watches


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
        # etcd's gRPC API through aetcd; without it, the JSON gateway's
        # prefix watch (every change of the fleet, filtered here).
        self.watch = "interest" if importlib.util.find_spec("aetcd") else "prefix"
        self.sync = FleetSync(cfg, self._incoming, own, self.host,
                              policy=self._policy_in if cfg.policy_prefix else None,
                              watch=self.watch)
        self.fetched: set[str] = set()  # VMs read on arrival, still of interest
        self.expected: dict[str, float] = {}  # vm -> until when (announced, no tap yet)
        self._next_interest = 0.0
        self.tenant_budget = cfg.tenant_budget is not None
        self.sync.policy_revision = self._policy[1]
        det.on_commit = lambda rec: self.sync.publish(
            FleetRecord.of(rec, self.host, det.blocks_at(rec.vm)))
        self.ifaces = ifaces
        self.budgets = (TenantBudgets(cfg.tenant_budget, self.sync, det)
                        if cfg.tenant_budget is not None else None)
        self.log.info("fleet.started", host=self.host, endpoints=list(cfg.endpoints),
                      prefix=cfg.prefix, records=len(own), watch=self.watch)

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
        # The VMs here now: read when their watches start (interest.py), not
        # one by one on the agent's loop.
        self.fetched = {v.vm for v in self.ifaces().values()}
        self._interest(force=True)
        self.sync.start()

    def stop(self) -> None:
        self.sync.stop()

    def collector(self) -> Any:
        return FleetCollector(self.sync)

    def arrive(self, vms: Iterable[str], expect: bool = False) -> None:
        """On the agent's loop, before these VMs' interfaces are enforced: the
        record of each one not read yet is read now and adopted, so its first
        SYN meets it (etcd away: each host decides locally, as ever). expect:
        announced by the hypervisor before its interfaces exist."""
        now = time.monotonic()
        new = [vm for vm in dict.fromkeys(vms) if vm not in self.fetched]
        if expect:
            for vm in new:
                self.expected[vm] = now + EXPECT
        if not new:
            return
        for vm in new:
            self.fetched.add(vm)
            try:
                rec = self.sync.fetch(vm, min(ARRIVAL_READ, self.sync.cfg.timeout))
            except EtcdError as exc:
                self.log.warning("fleet.arrival_unread", vm=vm, error=str(exc),
                                 hint="its record comes on the watch once etcd answers")
                continue
            if rec is not None:
                self.log.info("fleet.arrived", vm=vm, host=rec.host, state=rec.state,
                              until=rec.until, actor=rec.actor)
                try:
                    self.responder.adopt(rec, self.host)
                except Exception as exc:
                    self.log.error("fleet.adopt_failed", vm=vm, error=str(exc))
        self._interest(force=True)

    def _interest(self, force: bool = False) -> None:
        """What this host watches: the VMs it runs, those announced, those it
        holds a decision for; the tenants it hosts (with a budget)."""
        now_mono = time.monotonic()
        if not force and now_mono < self._next_interest:
            return
        self._next_interest = now_mono + INTEREST_EVERY
        now = time.time()
        ifaces = list(self.ifaces().values())
        self.expected = {vm: t for vm, t in self.expected.items() if t > now_mono}
        vms = {v.vm for v in ifaces} | set(self.expected)
        vms |= {r.vm for r in list(self.responder.detector.records.values())
                if r.state != "ok" or (r.manual_until or 0) > now}
        self.fetched &= vms  # one that leaves and comes back is read again
        tenants = {v.tenant for v in ifaces if v.tenant} if self.tenant_budget else set()
        self.sync.want(vms, tenants)

    def serve(self) -> None:
        """On the agent's loop: apply what came in; the tenants' budgets."""
        self._interest()
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
