"""Runs detection: feeds each snapshot of the counters into the windows,
steps the state machine of every VM that could have changed, stores the
transitions and hands them to the enforcement and the event sinks."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from smtpguard import logs
from smtpguard.datapath import distinct
from smtpguard.datapath.snapshot import read_sketch, sketch_over
from smtpguard.detect.machine import (
    Transition,
    VmRecord,
    decide,
    operator_block,
    operator_release,
)
from smtpguard.detect.windows import VmWindows, Windows
from smtpguard.errors import StoreError
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.classes import Threshold
from smtpguard.policy.membership import facts_of, place
from smtpguard.policy.model import Policy
from smtpguard.respond.store import Store

Act = Callable[[Transition, list[str]], None]  # transition, the VM's interfaces


class Detector:
    def __init__(self, policy: Policy, store: Store | None, act: Act,
                 emit: Callable[[Transition], None], dests: Any = None,
                 wall: Callable[[], float] = time.time,
                 mono_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.policy = policy
        self.store = store
        self.act = act
        self.emit = emit
        self.dests = dests  # the datapath's sketch map
        self.wall = wall
        self.mono_ns = mono_ns
        self.windows = Windows()
        self.records: dict[str, VmRecord] = {}
        self.totals: dict[str, tuple[int, ...]] = {}
        self.log = logs.get()
        self._memory: list[Transition] = []  # the offence history when there is no store
        # Called with each record this host decided (the fleet publishes it).
        self.on_commit: Callable[[VmRecord], None] | None = None
        self.fleet_blocks: dict[str, list[float]] = {}  # blocks made on other hosts

    def start(self) -> None:
        """Resume from the store: records, and each VM's last counter sample, so
        counts seen before the restart are not counted again and counts made
        while no agent ran are."""
        if self.store is None:
            return
        self.records = self.store.records()
        offset = self.wall() - self.mono_ns() / 1e9
        for vm, (at, values) in self.store.samples().items():
            self.windows.vms.setdefault(vm, VmWindows()).add(at - offset, values)

    def next_expiry(self, now: float) -> float | None:
        """The earliest block, throttle, flag or operator decision to end
        after now (wall clock), so the loop wakes for it instead of finding it
        on its next periodic pass."""
        ends = [t for r in self.records.values()
                for t in (r.until, r.manual_until, r.flagged_until) if t and t > now]
        return min(ends, default=None)

    def in_force(self) -> list[VmRecord]:
        return [r for r in self.records.values() if r.state in ("blocked", "throttled")]

    def _to_mono(self, wall_t: float) -> float:
        return wall_t - (self.wall() - self.mono_ns() / 1e9)

    def figure(self, vm: str, ifindexes: list[int], t: Threshold, since_wall: float,
               now_mono: float) -> float:
        since = self._to_mono(since_wall) if since_wall else 0.0
        if t.metric != "destinations":
            return self.windows.value(vm, t.metric, t.window, now_mono, since)
        sketches = [s for s in (read_sketch(self.dests, i) for i in ifindexes) if s is not None]
        if not sketches:
            return 0.0
        now_ns = int(now_mono * 1e9)
        return distinct.estimate(distinct.merge(
            sketch_over(s, now_ns, t.window, int(since * 1e9)) for s in sketches))

    def observe(self, per_iface: Mapping[int, tuple[int, int]],
                blocked: Mapping[str, int], ifaces: Mapping[int, VmIface]) -> list[Transition]:
        """One detection step. per_iface: ifindex -> (attempts, failed handshakes);
        blocked: rejected attempts by interface name."""
        now_mono = self.mono_ns() / 1e9
        now = self.wall()
        by_vm: dict[str, list[VmIface]] = {}
        for v in ifaces.values():
            by_vm.setdefault(v.vm, []).append(v)
        totals: dict[str, tuple[int, ...]] = {}
        for vm, vifs in by_vm.items():
            a = sum(per_iface.get(v.ifindex, (0, 0))[0] for v in vifs)
            f = sum(per_iface.get(v.ifindex, (0, 0))[1] for v in vifs)
            b = sum(blocked.get(v.ifname, 0) for v in vifs)
            totals[vm] = (a, b, f)  # windows.METRICS order
        self.windows.update(now_mono, totals)
        changed = {vm for vm, v in totals.items() if self.totals.get(vm) != v}
        self.totals = totals
        pending = {vm for vm, r in self.records.items() if r.state != "ok" or r.manual_until}
        out: list[Transition] = []
        for vm in sorted(changed | pending):
            vifs = by_vm.get(vm, [])
            facts = facts_of(vm, vifs)
            cls = self.policy.classes[place(self.policy, facts).cls]
            rec = self.records.get(vm, VmRecord(vm))
            idx = [v.ifindex for v in vifs]

            def fig(t: Threshold, since: float, vm: str = vm, idx: list[int] = idx) -> float:
                return self.figure(vm, idx, t, since, now_mono)

            new, trs = decide(rec, cls, fig, self._blocks_at(vm), now)
            if new != rec or trs:
                self._commit(new, trs, [v.ifname for v in vifs])
                out += trs
        return out

    def _blocks_at(self, vm: str) -> list[float]:
        return sorted(set(self._local_blocks_at(vm)) | set(self.fleet_blocks.get(vm, ())))

    def blocks_at(self, vm: str) -> list[float]:
        """When the VM was blocked automatically, here or (fleet) elsewhere."""
        return self._blocks_at(vm)

    def _local_blocks_at(self, vm: str) -> list[float]:
        if self.store is None:
            return [t.at for t in self._memory if t.vm == vm and t.new == "blocked"
                    and t.actor == "auto"]
        try:
            return self.store.blocks_at(vm)
        except Exception:
            return []

    def adopt(self, rec: VmRecord, trs: list[Transition], blocks: list[float]) -> None:
        """Another host's decision about this VM: recorded and kept like ours,
        not published again (the caller puts it in the kernel)."""
        self.records[rec.vm] = rec
        if blocks:
            self.fleet_blocks[rec.vm] = blocks
        if self.store is not None:
            try:
                self.store.save(rec, trs)
            except StoreError as exc:
                self.log.error("store.failed", error=str(exc))

    def _commit(self, rec: VmRecord, trs: list[Transition], ifnames: list[str]) -> None:
        self.records[rec.vm] = rec
        if self.on_commit is not None:
            self.on_commit(rec)
        if self.store is not None:
            try:
                self.store.save(rec, trs)
            except StoreError as exc:
                # The decision still stands in memory and in the kernel.
                self.log.error("store.failed", error=str(exc))
        else:
            self._memory = [*self._memory, *trs][-10000:]
        for t in trs:
            try:
                self.act(t, ifnames)
            except Exception as exc:
                self.log.error("enforce.action_failed", vm=t.vm, error=str(exc))
            self.emit(t)

    def operator(self, vm: str, ifnames: list[str], action: str, who: str,
                 duration: float | None, reason: str) -> Transition:
        rec = self.records.get(vm, VmRecord(vm))
        now = self.wall()
        if action in ("block", "throttle"):
            rec, tr = operator_block(rec, who, duration, reason, now,
                                     "blocked" if action == "block" else "throttled")
        else:
            rec, tr = operator_release(rec, who, duration or 3600.0, reason, now)
        self._commit(rec, [tr], ifnames)
        return tr

    def budget_action(self, vm: str, ifnames: list[str], state: str, duration: float,
                      reason: str, threshold: str, figures: dict[str, float]) -> Transition:
        """A decision from outside this VM's own thresholds (a tenant's
        budget over the fleet): throttled or flagged for `duration`, by "auto"."""
        rec = self.records.get(vm, VmRecord(vm))
        now = self.wall()
        if state == "throttled":
            until: float | None = now + duration
            new = replace(rec, state=state, since=now, until=until, reason=reason, actor="auto")
        else:
            until = None
            new = replace(rec, state="flagged", since=now, reason=reason, actor="auto",
                          flagged_until=now + duration)
        tr = Transition(vm, rec.state, new.state, now, until, reason, "auto",
                        threshold=threshold, figures=figures)
        self._commit(new, [tr], ifnames)
        return tr

    def save_samples(self) -> None:
        if self.store is None:
            return
        try:
            self.store.save_samples(self.wall(), self.totals)
        except StoreError as exc:
            self.log.error("store.failed", error=str(exc))

    def set_policy(self, policy: Policy) -> None:
        self.policy = policy

    def record(self, vm: str) -> VmRecord:
        return self.records.get(vm, VmRecord(vm))
