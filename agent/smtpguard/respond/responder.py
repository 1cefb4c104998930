"""From counters to consequences: runs detection over fresh counters, turns
its transitions into enforcement actions (or, in audit mode, into what would
have been done), records incidents, logs them and tells the webhook."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smtpguard import logs
from smtpguard.datapath import recent
from smtpguard.datapath.snapshot import read_ports
from smtpguard.detect.engine import Detector
from smtpguard.detect.machine import Transition
from smtpguard.enforce.desired import Action
from smtpguard.enforce.keeper import Keeper
from smtpguard.errors import SmtpguardError
from smtpguard.fleet.record import FleetRecord
from smtpguard.inventory.vmiface import VmIface
from smtpguard.observe.metrics import LOOP_BUCKETS
from smtpguard.observe.webhook import Webhook
from smtpguard.policy.load import LoadedPolicy
from smtpguard.policy.model import Policy, VmClass
from smtpguard.respond.evidence import Evidence
from smtpguard.respond.incidents import IncidentBook
from smtpguard.respond.store import Store
from smtpguard.respond.tripwire import TripWires

SAMPLE_EVERY = 10.0  # seconds between saves of the counter samples
PRUNE_EVERY = 3600.0  # seconds between prunings of old incidents
RETIRE_EVERY = 60.0  # seconds between retirements of idle interfaces' counters
# An interface's rejection counters are retired (enforce/counts.py) once its
# newest attempt is this old, and at least the policy's metrics.active_within:
# past any SYN retransmission of its attempts, and no longer exported per VM.
RETIRE_AFTER = 600.0


class Responder(Evidence, TripWires):
    """Detection over fresh counters, and what follows from its transitions."""

    def __init__(self, state_dir: Path, policy: Policy, stats: Any, dests: Any,
                 keeper: Keeper | None, ifaces: Callable[[], Mapping[int, VmIface]],
                 generation: Callable[[], int], clock: Callable[[], float] = time.monotonic,
                 recent_table: Any = None, loaded: Callable[[], LoadedPolicy] | None = None
                 ) -> None:
        self.log = logs.get()
        self.stats = stats
        self.recent = recent_table
        self.loaded = loaded or (lambda: LoadedPolicy(self.detector.policy))
        self.keeper = keeper
        self.ifaces = ifaces
        self.generation = generation
        self.clock = clock
        self.store: Store | None = None
        try:
            self.store = Store(state_dir / "state.db")
        except SmtpguardError as exc:
            # Detection goes on in memory; what is in the kernel stays as it is.
            self.log.error("store.failed", error=str(exc), hint="running without persistence")
        self.detector = Detector(policy, self.store, self.act, self.emit, dests=dests)
        self.webhook: Webhook | None = None
        self.actions_total: dict[str, int] = {}
        self.elsewhere: dict[str, str] = {}  # vm -> the host whose record was adopted (fleet)
        self.loop_buckets = [0] * len(LOOP_BUCKETS)
        self.loop_sum = 0.0
        self.loop_n = 0
        self._next_samples = 0.0
        self._next_prune = 0.0
        self._next_retire = 0.0
        # smtp_trip (datapath/trip.py) when the tables reject marked SYNs, else
        # None.
        self.trips: Any = None
        # _arm_plan's (interfaces, policy, VMs to arm), and the interfaces this
        # run armed, each with the (budget, attempts) it was last seen with
        # (only those are read back).
        self._plan: tuple[Any, Any, list[tuple[str, list[VmIface], VmClass, str]]] | None = None
        self._wired: dict[int, tuple[int, int]] = {}
        self.last_loop = 0.0
        self.incidents = IncidentBook(self.store, self.activity, self.context)
        self._loaded = False
        self.configure(policy)

    def load(self) -> bool:
        """Resume the VMs' records from the store. False: there is no store to
        say what is in force (the keeper then adopts what the kernel holds)."""
        self._loaded = True
        try:
            self.detector.start()
        except SmtpguardError as exc:
            self.log.error("store.failed", error=str(exc))
            return False
        return self.store is not None

    def start(self) -> None:
        """Resume (load() if not done); blocks and throttles in force get their
        kernel elements back with the same expiry (even after a reboot)."""
        if not self._loaded:
            self._loaded = True
            self.load()
        self.incidents.start()
        self.reassert()

    def actions_in_force(self) -> dict[str, Action]:
        """vm -> the block or throttle its record holds (the truth the keeper
        renders onto the VM's interfaces)."""
        return {rec.vm: Action("block" if rec.state == "blocked" else "throttle", rec.until)
                for rec in self.detector.in_force()}

    def reassert(self) -> None:
        """Give the keeper every block and throttle detection holds (after a
        start, a reboot that emptied the kernel, or a flushed ruleset); it puts
        them onto the VMs' interfaces where they are missing."""
        for vm, action in self.actions_in_force().items():
            if self.keeper is not None and self.keeper.vm_actions.get(vm) != action:
                self.keeper.set_action(vm, action)
            self.log.info("vm.resumed", vm=vm, state="blocked" if action.kind == "block"
                          else "throttled", until=action.until)

    def configure(self, policy: Policy) -> None:
        self.detector.set_policy(policy)
        hook = policy.webhook
        if self.webhook is not None and (hook is None or hook.url != self.webhook.url):
            self.webhook.stop(drain=0)
            self.webhook = None
        if hook is not None and self.webhook is None:
            self.webhook = Webhook(hook.url, hook.timeout, hook.queue, hook.events)

    def stop(self) -> None:
        self.detector.save_samples()
        if self.webhook is not None:
            self.webhook.stop()

    def detect(self) -> None:
        """One detection step over fresh counters; timed for the loop histogram."""
        t0 = time.monotonic()
        try:
            per_iface = {}
            read = read_ports(self.stats)
            for ifindex, ports in read.items():
                per_iface[ifindex] = (sum(c.attempts for c in ports.values()),
                                      sum(c.reset + c.no_answer for c in ports.values()))
            if self.clock() >= self._next_retire:
                self._next_retire = self.clock() + RETIRE_EVERY
                self._retire_idle(read)
            blocked: dict[str, int] = {}
            if self.keeper is not None:
                for c in self.keeper.enforcer.blocked_counts():
                    blocked[c.ifname] = blocked.get(c.ifname, 0) + c.packets
            self.detector.observe(per_iface, blocked, self.ifaces())
            if self.trips is not None:
                self._arm(read)
            self._observe_loop(time.monotonic() - t0)
            self.last_loop = time.time()
            if self.clock() >= self._next_samples:
                self._next_samples = self.clock() + SAMPLE_EVERY
                self.detector.save_samples()
            if self.clock() >= self._next_prune:
                self._next_prune = self.clock() + PRUNE_EVERY
                self.incidents.prune(self.detector.policy.incidents.retention)
        except Exception as exc:
            self.log.error("detect.failed", error=str(exc))
            self.log.debug("detect.failed", exc_info=True)

    def _retire_idle(self, read: Mapping[int, Mapping[int, Any]]) -> None:
        """Retire the rejection counters of interfaces idle for RETIRE_AFTER
        (and active_within): the listing every step and scrape makes then
        holds the VMs that send, not every VM that ever did."""
        retire = getattr(self.keeper.enforcer, "retire", None) if self.keeper else None
        if retire is None:
            return  # the iptables backend's counters are its rules'
        after = max(RETIRE_AFTER, self.detector.policy.metrics.active_within)
        since = time.monotonic_ns() - int(after * 1e9)  # the classifier's clock
        idle = [v.ifname for v in self.ifaces().values()
                if (ports := read.get(v.ifindex))
                and max(c.last_attempt_ns for c in ports.values()) < since]
        try:
            retire(idle)
        except SmtpguardError as exc:
            self.log.warning("enforce.retire_failed", error=str(exc))

    def _observe_loop(self, seconds: float) -> None:
        self.loop_sum += seconds
        self.loop_n += 1
        for i, b in enumerate(LOOP_BUCKETS):
            if seconds <= b:
                self.loop_buckets[i] += 1

    def enforced(self, t: Transition) -> bool:
        """Whether this transition acts in the kernel: not for a VM whose class
        runs in audit mode, unless an operator decided it."""
        return t.actor.startswith("operator") or self.mode_of(t.vm) != "audit"

    def act(self, t: Transition, ifnames: list[str]) -> None:
        action = {"blocked": "block", "throttled": "throttle"}.get(t.new)
        counted = action or ("release" if t.new == "ok" and t.old in ("blocked", "throttled")
                             else "flag" if t.new == "flagged" else None)
        enforced = self.enforced(t)
        if counted and (enforced or counted != "release"):
            key = counted if enforced else f"would_{counted}"
            self.actions_total[key] = self.actions_total.get(key, 0) + 1
        # A release always goes through: it only ever removes enforcement (say,
        # a block from before the class switched to audit).
        # A VM without an interface now (stopped) keeps its block in the
        # keeper's record and gets it on the interface it comes back on.
        if self.keeper is None or (not enforced and t.new != "ok"):
            return
        if t.new == "blocked":
            self.keeper.set_action(t.vm, Action("block", t.until))
        elif t.new == "throttled":
            self.keeper.set_action(t.vm, Action("throttle", t.until))
        elif t.old in ("blocked", "throttled") or t.actor.startswith("operator"):
            # An operator's release clears the kernel even for a block that
            # detection did not know about.
            self.keeper.set_action(t.vm, None)

    def adopt(self, fr: FleetRecord, here: str) -> bool:
        """Another host's record for a VM (fleet): taken when it is a later
        decision than ours (record.py says why that rule), then in the
        kernel as our own would be: a VM that is not here yet gets it on
        the interface it comes on, before its first SYN is let through."""
        # Where the VM was last decided: a record held here for a VM that
        # runs elsewhere is not one of this host's VMs (report.health).
        if fr.host != here:
            self.elsewhere[fr.vm] = fr.host
        else:
            self.elsewhere.pop(fr.vm, None)
        local = self.detector.records.get(fr.vm)
        now = time.time()
        if local is not None and not fr.newer_than(local.since, here):
            return False
        if local is None and fr.state == "ok" and not (fr.manual_until or 0) > now:
            return False  # nothing to hold for a VM we never knew
        old = local.state if local is not None else "ok"
        rec = fr.vm_record(local.baseline if local is not None else 0.0)
        t = Transition(fr.vm, old, fr.state, fr.since, fr.until, fr.reason, fr.actor)
        self.detector.adopt(rec, [t] if old != fr.state else [], list(fr.blocks))
        if self.keeper is not None and (self.enforced(t) or fr.state == "ok"):
            want = (Action("block", fr.until) if fr.state == "blocked" else
                    Action("throttle", fr.until) if fr.state == "throttled" else None)
            if self.keeper.vm_actions.get(fr.vm) != want:
                self.keeper.set_action(fr.vm, want)
        self.log.info("fleet.adopted", vm=fr.vm, host=fr.host, state=fr.state, previous=old,
                      until=fr.until, actor=fr.actor, reason=fr.reason)
        return True

    def emit(self, t: Transition) -> None:
        inc = self.incidents.record(t, self.enforced(t))
        if t.new == "ok" and self.recent is not None:
            # The VM starts afresh: its next incident lists only what it does next.
            idx = [v.ifindex for v in self._vifs(t.vm)]
            try:
                recent.forget(self.recent, idx)
            except OSError as exc:
                self.log.debug("recent.forget_failed", error=str(exc))
        ifaces = sorted(v.ifname for v in self.ifaces().values() if v.vm == t.vm)
        fields = {"vm": t.vm, "interfaces": ifaces, "state": t.new, "previous": t.old,
                  "reason": t.reason, "actor": t.actor, "until": t.until,
                  "threshold": t.threshold, "figures": t.figures, "offence": t.offence,
                  "incident": None if inc is None else inc["id"],
                  "enforced": self.enforced(t)}
        self.log.info(t.event, **fields)
        if self.webhook is not None:
            self.webhook.offer({"event": t.event, "at": t.at, "host": socket.gethostname(),
                                "policy_generation": self.generation(), **fields})
