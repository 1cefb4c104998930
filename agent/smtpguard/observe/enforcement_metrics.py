"""The enforcement's collector: what nftables (or iptables) rejected, read from
our tables' counters at scrape time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from smtpguard import logs
from smtpguard.enforce.render import REASONS
from smtpguard.inventory.vmiface import VmIface
from smtpguard.observe.metrics import (
    Activity,
    Totals,
)


class EnforcementCollector(Collector):
    """What nftables rejected, from the counters in our tables. A sample:

        smtpguard_smtp_blocked_attempts_total{vm="web1",interface="vnet3",port="25",
                                              reason="port25"} 12.0
        smtpguard_host_smtp_blocked_attempts_total{port="25",reason="port25"} 340.0
        smtpguard_nft_set_elements{family="bridge",set="seen4"} 12.0
        smtpguard_nft_set_size{family="bridge",set="seen4"} 131072.0
        smtpguard_nft_overflow_total 0.0

    Blocked attempts are distinct attempts: a retransmitted SYN is not counted
    again. Per VM only for the VMs `activity` exports (the datapath's rule,
    from its read in this scrape; a blocked attempt is an attempt there too);
    with no activity given, every VM. Nothing is exported when the tables cannot be read.
    """

    def __init__(self, enforcer: Any, ifaces: Callable[[], Mapping[int, VmIface]],
                 keeper: Any = None, activity: Activity | None = None) -> None:
        self._enforcer = enforcer
        self._ifaces = ifaces
        self._keeper = keeper
        self._activity = activity
        self._lock = threading.Lock()
        self._totals: Totals[tuple[str, str]] = Totals()

    def collect(self) -> Iterator[Metric]:
        if self._keeper is not None:
            repairs = CounterMetricFamily(
                "smtpguard_enforcement_repairs",
                "Interfaces whose block/throttle in the kernel differed from their VM's "
                "record and were put right (missing, unexpected, changed)", labels=["kind"])
            for kind, n in sorted(self._keeper.repairs.items()):
                repairs.add_metric([kind], n)
            yield repairs
        with self._lock:
            try:
                counts, fill, overflow = self._enforcer.report()
            except Exception:
                logs.get().debug("metrics.nft_read_failed", exc_info=True)
                return
            if self._activity is not None:
                self._activity.prepare()  # the datapath's read for this scrape, after ours
            ports = () if self._activity is None else self._activity.ports
            host = self._totals.update(
                [((str(c.port), c.reason), (c.family, c.ifname, c.port, c.reason), (c.packets,))
                 for c in counts], [(str(p), r) for p in ports for r in REASONS])
        vm_of = {v.ifname: v.vm for v in self._ifaces().values()}
        exported = None if self._activity is None else self._activity.exported
        counted = frozenset() if self._activity is None else self._activity.counted
        blocked = CounterMetricFamily(
            "smtpguard_smtp_blocked_attempts",
            "SMTP connection attempts rejected by the enforcement, by reason",
            labels=["vm", "interface", "port", "reason"])
        totals: dict[tuple[str, str, str, str], int] = {}
        for c in counts:
            vm = vm_of.get(c.ifname, c.ifname)
            if exported is not None and vm not in exported and vm in counted:
                continue  # idle (what was never counted as an attempt is shown)
            key = (vm, c.ifname, str(c.port), c.reason)
            totals[key] = totals.get(key, 0) + c.packets
        for key, n in sorted(totals.items()):
            blocked.add_metric(list(key), n)
        yield blocked
        per_host = CounterMetricFamily(
            "smtpguard_host_smtp_blocked_attempts",
            "SMTP connection attempts of all VMs on this host rejected by the enforcement, "
            "by reason, since the agent started", labels=["port", "reason"])
        for (port, reason), (n,) in sorted(host.items()):
            per_host.add_metric([port, reason], n)
        yield per_host
        elements = GaugeMetricFamily("smtpguard_nft_set_elements",
                                     "Elements in each sized nftables set of ours",
                                     labels=["family", "set"])
        size = GaugeMetricFamily("smtpguard_nft_set_size", "Capacity of each sized set",
                                 labels=["family", "set"])
        for (fam, name), (n, cap) in sorted(fill.items()):
            elements.add_metric([fam, name], n)
            size.add_metric([fam, name], cap)
        yield elements
        yield size
        over = CounterMetricFamily(
            "smtpguard_nft_overflow",
            "Attempts rejected without dedup or per-VM count because a set was full")
        over.add_metric([], overflow)
        yield over
