"""A tenant's budget over the whole fleet (the policy's
fleet.tenant_budget): new SMTP connections that all of a tenant's VMs open,
on every host, within a window.

Each host counts its own VMs of each tenant (the detector's windows) and
publishes that count every `share_every` while it is not 0 (one small write
per tenant with traffic, per host: a bounded write rate), under its presence
lease, so a dead host's counts go with it. A host watches only the counts of
the tenants it hosts (FleetLink's interest), so a count reaches the tenant's
other hosts, not the fleet. Every host adds up the fresh counts; past the
budget, each of the tenant's VMs on this host is throttled (or flagged), and
the reason names the figure, the hosts and the VMs, so each VM's incident
tells the whole story. An operator's release (immunity) is respected.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from smtpguard import logs
from smtpguard.detect.engine import Detector
from smtpguard.fleet.sync import FleetSync
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.model import TenantBudget
from smtpguard.policy.units import format_duration

STALE = 3  # a host's count older than this many share_every is not added


class TenantBudgets:
    def __init__(self, budget: TenantBudget, sync: FleetSync, detector: Detector) -> None:
        self.budget = budget
        self.sync = sync
        self.detector = detector
        self.log = logs.get()
        self._next = 0.0
        self._active: set[str] = set()  # tenants whose last count here was not 0

    def step(self, ifaces: Mapping[int, VmIface]) -> None:
        """On the agent's loop; acts at most every share_every."""
        now_mono = time.monotonic()
        if now_mono < self._next:
            return
        self._next = now_mono + self.budget.share_every
        now = time.time()
        b = self.budget
        mono_now = self.detector.mono_ns() / 1e9
        local: dict[str, dict[str, list[str]]] = {}  # tenant -> vm -> its interfaces
        for v in ifaces.values():
            if v.tenant:
                local.setdefault(v.tenant, {}).setdefault(v.vm, []).append(v.ifname)
        for tenant, vms in local.items():
            mine = sum(self.detector.windows.value(vm, "attempts", b.window, mono_now)
                       for vm in vms)
            # Only a tenant with activity here is published (and once more
            # when it ends): a quiet tenant costs its hosts nothing.
            if mine or tenant in self._active:
                self.sync.share_tenant(tenant, {"attempts": mine, "vms": sorted(vms),
                                                "at": now})
            if mine:
                self._active.add(tenant)
            else:
                self._active.discard(tenant)
            total, hosts, all_vms = mine, [self.sync.host], set(vms)
            for host, c in self.sync.tenant_counts(tenant).items():
                at = c.get("at")
                if host == self.sync.host or not isinstance(at, (int, float)) or \
                        at < now - STALE * b.share_every:
                    continue
                n = c.get("attempts")
                total += int(n) if isinstance(n, (int, float)) else 0
                hosts.append(host)
                vlist = c.get("vms")
                all_vms |= set(vlist) if isinstance(vlist, list) else set()
            if total >= b.at_most:
                self._act(tenant, vms, total, sorted(hosts), sorted(all_vms), now)

    def _act(self, tenant: str, vms: dict[str, list[str]], total: int, hosts: list[str],
             all_vms: list[str], now: float) -> None:
        b = self.budget
        state = "throttled" if b.action == "throttle" else "flagged"
        reason = (f"tenant {tenant}: attempts {total} >= {b.at_most} in "
                  f"{format_duration(b.window)} over hosts {', '.join(hosts)} "
                  f"(VMs {', '.join(all_vms)})")
        for vm, ifnames in sorted(vms.items()):
            rec = self.detector.record(vm)
            if rec.state in ("throttled", "blocked") or (rec.manual_until or 0) > now or \
                    (state == "flagged" and rec.state == "flagged"):
                continue
            self.detector.budget_action(vm, ifnames, state, b.duration, reason,
                                        f"tenant:{b.name}",
                                        {"attempts": float(total), "hosts": float(len(hosts))})
            self.log.info("fleet.tenant_over_budget", tenant=tenant, vm=vm, attempts=total,
                          at_most=b.at_most, hosts=hosts, vms=all_vms, action=b.action)
