"""Each VM's trip wire (datapath/trip.py) armed with what it may still
attempt before a block threshold fires, after every detection step. Mixed
into the Responder, whose attributes it reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from smtpguard.datapath import trip
from smtpguard.datapath.maps import SmtpKey
from smtpguard.detect.engine import Detector
from smtpguard.detect.machine import VmRecord, block_thresholds, trip_budget
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.membership import facts_of, place
from smtpguard.policy.model import VmClass


class TripWires:
    """The wires this run armed, kept to what the records allow."""

    stats: Any
    detector: Detector
    ifaces: Callable[[], Mapping[int, VmIface]]
    # smtp_trip (datapath/trip.py) when the tables reject marked SYNs, else
    # None.
    trips: Any
    # _arm_plan's (interfaces, policy, VMs to arm), and the interfaces this
    # run armed, each with the (budget, attempts) it was last seen with
    # (only those are read back).
    _plan: tuple[Any, Any, list[tuple[str, list[VmIface], VmClass, str]]] | None
    _wired: dict[int, tuple[int, int]]

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
