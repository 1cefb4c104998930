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
from smtpguard.datapath import recent, trip
from smtpguard.datapath.maps import SmtpKey
from smtpguard.datapath.snapshot import read_ports
from smtpguard.detect.engine import Detector
from smtpguard.detect.machine import Transition, VmRecord, block_thresholds, trip_budget
from smtpguard.enforce.desired import Action
from smtpguard.enforce.keeper import Keeper
from smtpguard.errors import SmtpguardError
from smtpguard.fleet.record import FleetRecord
from smtpguard.incidents import IncidentBook
from smtpguard.inventory.vmiface import VmIface
from smtpguard.metrics import LOOP_BUCKETS
from smtpguard.policy.explain import threshold_text
from smtpguard.policy.load import LoadedPolicy
from smtpguard.policy.membership import facts_of, place
from smtpguard.policy.model import Policy, VmClass
from smtpguard.store import Store
from smtpguard.webhook import Webhook

SAMPLE_EVERY = 10.0  # seconds between saves of the counter samples
PRUNE_EVERY = 3600.0  # seconds between prunings of old incidents
RETIRE_EVERY = 60.0  # seconds between retirements of idle interfaces' counters
# An interface's rejection counters are retired (enforce/counts.py) once its
# newest attempt is this old, and at least the policy's metrics.active_within:
# past any SYN retransmission of its attempts, and no longer exported per VM.
RETIRE_AFTER = 600.0
WINDOWS = (("attempts", 60), ("attempts", 3600), ("blocked_attempts", 600),
           ("failed_handshakes", 600))  # recorded with each incident


def outcomes(per_iface: Mapping[int, Mapping[int, Any]], ifindexes: list[int],
             rejected: Mapping[int, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """Per port, what became of a VM's attempts, adding up to them: completed,
    rejected (by smtpguard itself), reset and unanswered (by the other end),
    pending (no answer yet, or the client gave up before retrying).

    The datapath sees the wire: smtpguard's own TCP reset answers the SYN like
    a receiver's would, and a SYN it drops is retried until it counts as
    unanswered. So rejections (distinct attempts, counted by the enforcement)
    are taken out of the resets where the path rejects with a reset, and out
    of the unanswered where it drops."""
    ports: dict[str, dict[str, int]] = {}
    for ifindex, per_port in per_iface.items():
        if ifindex not in ifindexes:
            continue
        for port, c in per_port.items():
            p = ports.setdefault(str(port), dict.fromkeys(
                ("attempts", "completed", "rejected", "reset", "no_answer", "pending",
                 "retransmits"), 0))
            for k in ("attempts", "completed", "reset", "no_answer", "retransmits"):
                p[k] += getattr(c, k)
    for port, (by_reset, by_drop) in rejected.items():
        if str(port) not in ports:
            continue
        p = ports[str(port)]
        p["rejected"] = by_reset + by_drop
        p["reset"] = max(0, p["reset"] - by_reset)
        p["no_answer"] = max(0, p["no_answer"] - by_drop)
    for p in ports.values():
        # Counters read a moment apart may overshoot: the columns still add up.
        left = max(0, p["attempts"] - p["completed"])
        for k in ("rejected", "reset", "no_answer"):
            p[k] = min(p[k], left)
            left -= p[k]
        p["pending"] = left
    return ports


class Responder:
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

    def _arm_plan(self) -> list[tuple[str, list[VmIface], VmClass, str]]:
        """The VMs that have a wire to arm (their class blocks on attempts),
        with their interfaces, class and mode: placed again only when the
        interfaces or the policy change (both are replaced, never edited),
        not on every step (placing 1,000 VMs was most of an idle loop)."""
        ifaces, pol = self.ifaces(), self.detector.policy
        if self._plan is None or self._plan[0] is not ifaces or self._plan[1] is not pol:
            by_vm: dict[str, list[VmIface]] = {}
            for v in ifaces.values():
                by_vm.setdefault(v.vm, []).append(v)
            plan: list[tuple[str, list[VmIface], VmClass, str]] = []
            for vm, vifs in by_vm.items():
                name = place(pol, facts_of(vm, vifs)).cls
                cls = pol.classes[name]
                if block_thresholds(cls):
                    plan.append((vm, vifs, cls, pol.mode_of(name)))
            self._plan = (ifaces, pol, plan)
            return plan
        return self._plan[2]

    def _arm(self, read: Mapping[int, Mapping[int, Any]]) -> None:
        """Each VM's trip wire set to what it may still attempt before a
        block threshold fires (detect.machine.trip_budget), written only
        where the kernel's differs: after the detection step, so a VM it
        just blocked is disarmed and one released is armed again. A wire
        whose budget and attempts are as the last step left them is not read
        back (the classifier counts only new attempts)."""
        det = self.detector
        now_mono = det.mono_ns() / 1e9
        planned: set[int] = set()
        for vm, vifs, cls, mode in self._arm_plan():
            idx = [v.ifindex for v in vifs]

            def fig(t: Any, since: float, vm: str = vm, idx: list[int] = idx) -> float:
                return det.figure(vm, idx, t, since, now_mono)

            rec = det.records.get(vm) or VmRecord(vm)
            budget = trip_budget(rec, cls, mode, fig)
            for v in vifs:
                if budget is None:
                    continue  # disarmed below, as not planned
                planned.add(v.ifindex)
                seen = sum(c.attempts for c in read.get(v.ifindex, {}).values())
                if self._wired.get(v.ifindex) == (budget, seen):
                    continue  # as armed, and nothing attempted since: most VMs
                have = trip.left(self.trips, v.ifindex)
                self._wired[v.ifindex] = (budget, seen)
                if have == budget:
                    continue
                # What the VM attempted since `read` counts against the budget.
                want = budget - (self._attempts(v.ifindex, read) - seen)
                if have is None or have != max(want, 0):
                    trip.arm(self.trips, v.ifindex, want)
        present = self.ifaces()
        for ifindex in set(self._wired) - planned:
            del self._wired[ifindex]
            if ifindex in present:  # (a gone interface's entry went with it: Datapath.forget)
                trip.disarm(self.trips, ifindex)

    def _attempts(self, ifindex: int, read: Mapping[int, Mapping[int, Any]]) -> int:
        """The interface's attempts now, on the ports `read` had for it."""
        n = 0
        for port, c in read.get(ifindex, {}).items():
            try:
                n += int(self.stats[SmtpKey(ifindex, port)].attempts)
            except KeyError:
                n += c.attempts
        return n

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

    # -- evidence ------------------------------------------------------------
    def _vifs(self, vm: str) -> list[VmIface]:
        return sorted((v for v in self.ifaces().values() if v.vm == vm),
                      key=lambda v: v.ifname)

    def class_of(self, vm: str) -> str:
        vifs = self._vifs(vm)
        facts = facts_of(vm, vifs)
        return place(self.detector.policy, facts).cls

    def mode_of(self, vm: str) -> str:
        return self.detector.policy.mode_of(self.class_of(vm))

    def activity(self, vm: str) -> dict[str, Any]:
        """What the VM did since it last started afresh: attempts and top
        destinations (the datapath's per-VM record), counters per port."""
        idx = [v.ifindex for v in self._vifs(vm)]
        dests = recent.top_destinations(self.recent, idx, limit=None) \
            if self.recent is not None and idx else []
        top = self.detector.policy.incidents.top_destinations
        ports = outcomes(read_ports(self.stats), idx, self._rejections(vm))
        return {"at": time.time(), "attempts": sum(d.attempts for d in dests),
                "destinations": len(dests),
                "top_destinations": [{"address": d.address, "attempts": d.attempts}
                                     for d in dests[:top]],
                "ports": ports}

    def _rejections(self, vm: str) -> dict[int, tuple[int, int]]:
        """port -> (attempts smtpguard rejected with a TCP reset, and dropped),
        for the VM's interfaces, from the enforcement's counters."""
        if self.keeper is None:
            return {}
        names = {v.ifname for v in self._vifs(vm)}
        caps = self.keeper.enforcer.caps
        out: dict[int, tuple[int, int]] = {}
        try:
            counts = self.keeper.enforcer.blocked_counts()
        except SmtpguardError as exc:
            self.log.debug("enforce.counts_failed", error=str(exc))
            return {}
        for c in counts:
            if c.ifname not in names:
                continue
            reset = caps.reject_bridge if c.family == "bridge" else caps.reject_inet
            r, d = out.get(c.port, (0, 0))
            out[c.port] = (r + c.packets, d) if reset else (r, d + c.packets)
        return out

    def context(self, vm: str, threshold: str | None) -> dict[str, Any]:
        """The class, mode, rule and policy an incident records."""
        loaded = self.loaded()
        pol = loaded.policy
        cls = self.class_of(vm)
        rule = None
        for i, t in enumerate(pol.classes[cls].thresholds):
            if t.label == threshold:
                rule = {"class": cls, "threshold": t.label, "text": threshold_text(t),
                        "where": loaded.where(f"classes.{cls}.thresholds.{i}")}
        now = time.monotonic_ns() / 1e9
        windows = {f"{m}_{w // 60 if w < 3600 else w // 3600}{'m' if w < 3600 else 'h'}":
                   float(self.detector.windows.value(vm, m, w, now)) for m, w in WINDOWS}
        vifs = self._vifs(vm)
        return {"class": cls, "mode": pol.mode_of(cls),
                "name": vifs[0].display if vifs else vm,
                "uuid": vifs[0].uuid if vifs else None,
                "tenant": vifs[0].tenant if vifs else None,
                "interfaces": [v.ifname for v in vifs], "rule": rule,
                "windows": windows,
                "policy": {"generation": self.generation(), "digest": loaded.digest,
                           "files": list(loaded.files) or ["built-in default"]}}
