"""What the agent reports: its health for the metrics and the watchdog,
uncovered VMs, and the per-VM count logs."""

from __future__ import annotations

import time

from smtpguard.daemon.state import AgentState
from smtpguard.datapath.snapshot import Snapshot, take
from smtpguard.inventory.identity import Uncovered
from smtpguard.observe.metrics import Health


class Reporting(AgentState):
    """Health, uncovered VMs and count logs, from the agent's state."""

    def _healthy(self) -> bool:
        """The loop runs, the classifier is loaded, detection stepped lately."""
        r = self.responder
        fresh = r is None or r.last_loop == 0 or time.time() - r.last_loop < 10
        return self.datapath.loaded and fresh

    def health(self) -> Health:
        states: dict[str, str] = {v.vm: "ok" for v in self.ifaces.values()}
        r = self.responder
        uncovered: dict[str, int] = {}
        for u in self.uncovered():
            uncovered[u.reason] = uncovered.get(u.reason, 0) + 1
        unenforced: dict[str, int] = {}
        for v in self.ifaces.values():
            if self.keeper is not None and not self.keeper.reaches(v):
                unenforced[v.attachment] = unenforced.get(v.attachment, 0) + 1
        if r is None:
            return Health(self.generation, dict(self.reloads), states,
                          unattached=len(self.unattached), uncovered=uncovered,
                          unenforced=unenforced)
        # A VM not here now counts while its record is this host's own (a
        # stopped VM keeps its block); one adopted from another host's record
        # (fleet) is held here for its arrival, not one of this host's VMs.
        states.update({rec.vm: rec.state for rec in r.detector.records.values()
                       if rec.vm in states or (rec.state != "ok" and rec.vm not in r.elsewhere)})
        return Health(self.generation, dict(self.reloads), states, dict(r.actions_total),
                      (tuple(r.loop_buckets), r.loop_sum, r.loop_n), r.last_loop,
                      len(self.unattached), uncovered, unenforced)

    def uncovered(self) -> list[Uncovered]:
        """VMs the hypervisor runs here whose traffic never crosses the host
        kernel (nothing to count or enforce: say so, never skip in silence);
        one with an interface we do see is covered there and not listed."""
        seen = {v.vm for v in self.ifaces.values()}
        return [u for u in self.resolver.uncovered() if u.vm not in seen]

    def _say_uncovered(self) -> None:
        """Log each uncovered VM once (per reason) while it is there."""
        now = {(u.vm, u.reason): u for u in self.uncovered()}
        for key in sorted(set(now) - self._uncovered_said):
            u = now[key]
            self.log.warning("vm.uncovered", vm=u.vm, name=u.name, reason=u.reason,
                             source=u.source, detail=u.detail,
                             hint="its traffic bypasses the host kernel: nothing is "
                             "counted or enforced for it on this host")
        self._uncovered_said = set(now)

    def snapshot(self) -> Snapshot:
        return take(self.datapath.table("smtp_stats"), self.datapath.table("smtp_dests"))

    def log_counts(self, final: bool = False) -> None:
        """One vm.counts event per interface whose counters moved (all at exit)."""
        snap = self.snapshot()
        for ifindex, vif in sorted(self.ifaces.items()):
            s = snap.ifaces.get(ifindex)
            if s is None:
                continue
            key = tuple(c.attempts + c.completed + c.reset + c.no_answer
                        for c in s.ports.values())
            if not final and self._last_logged.get(ifindex) == key:
                continue
            self._last_logged[ifindex] = key
            self.log.info(
                "vm.counts", vm=vif.vm, interface=vif.ifname, final=final,
                attempts={str(p): c.attempts for p, c in sorted(s.ports.items())},
                completed=sum(c.completed for c in s.ports.values()),
                reset=sum(c.reset for c in s.ports.values()),
                no_answer=sum(c.no_answer for c in s.ports.values()),
                destinations=dict(s.destinations),
            )
