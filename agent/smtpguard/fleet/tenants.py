"""A tenant's budget over the whole fleet (the policy's
fleet.tenant_budget): new SMTP connections that all of a tenant's VMs open,
on every host, within a window.

Each host counts its own VMs of each tenant (the detector's windows) and
looks at the count every `share_every`. It publishes the count (one small
write, under its presence lease, so a dead host's counts go with it) when
the tenant first has traffic here, when the count has moved since it last
went out by a share of what is left of the budget (`step`: half the
headroom, split over the tenant's hosts; 1 near the budget), once every
REFRESH share_every while it is not 0, and once as 0 when the traffic or
the tenant's last VM here is gone. Far below the budget a host with steady
traffic writes once a minute (share_every 5 s), not every 5 s; near it,
every change goes out. Whenever the tenant's real total reaches the budget,
at least one host's sum does (what the hosts have not published is less than
half the smallest headroom any of them sees), and each host that sees it
acts. A host watches only the counts of the tenants it hosts (FleetLink's
interest), so a count reaches the tenant's other hosts, not the fleet. Every
host adds up the fresh counts; past the budget, each of the tenant's VMs on
this host is throttled (or flagged), and the reason names the figure, the
hosts and the VMs, so each VM's incident tells the whole story. An
operator's release (immunity) is respected.
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

REFRESH = 12  # an unchanged count goes out again after this many share_every
STALE = 3 * REFRESH  # a host's count older than this many share_every is not added


def step(at_most: int, total: int, hosts: int) -> int:
    """How far a host's count may move before it goes out: half of what is
    left of the budget, split over the tenant's hosts (1 near or past it)."""
    return max(1, (at_most - total) // (2 * max(hosts, 1)))


def due(mine: int, sent: int | None, total: int, hosts: int, at_most: int,
        age: float, refresh: float) -> bool:
    """Whether this host's count for a tenant goes out now: `sent` is the
    count it last published (None: never), `age` the seconds since, `total`
    and `hosts` the tenant's sum and hosts as this host sees them."""
    if sent is None:
        return mine > 0  # its first traffic here
    if mine == sent:
        return mine > 0 and age >= refresh  # fresh, for the others' sums
    return mine == 0 or age >= refresh or abs(mine - sent) >= step(at_most, total, hosts)


class TenantBudgets:
    def __init__(self, budget: TenantBudget, sync: FleetSync, detector: Detector) -> None:
        self.budget = budget
        self.sync = sync
        self.detector = detector
        self.log = logs.get()
        self._next = 0.0
        self._sent: dict[str, tuple[int, float]] = {}  # tenant -> (count published, when)
        self.shared = 0  # counts published

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
        for tenant in [t for t in self._sent if t not in local]:
            # The tenant's last VM here went: its count goes out as 0, once.
            if self._sent.pop(tenant)[0]:
                self._share(tenant, 0, [], now)
        for tenant, vms in local.items():
            mine = sum(self.detector.windows.value(vm, "attempts", b.window, mono_now)
                       for vm in vms)
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
            sent, when = self._sent.get(tenant, (None, 0.0))
            if due(mine, sent, total, len(hosts), b.at_most, now - when,
                   REFRESH * b.share_every):
                self._share(tenant, mine, sorted(vms), now)
            if total >= b.at_most:
                self._act(tenant, vms, total, sorted(hosts), sorted(all_vms), now)

    def _share(self, tenant: str, mine: int, vms: list[str], now: float) -> None:
        self.sync.share_tenant(tenant, {"attempts": mine, "vms": vms, "at": now})
        self._sent[tenant] = (mine, now)
        self.shared += 1

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
