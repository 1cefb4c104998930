"""Prometheus metrics, read from the BPF maps at scrape time."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from smtpguard import __version__, logs
from smtpguard.datapath.interfaces import VmIface
from smtpguard.datapath.snapshot import IfaceSnapshot, Snapshot, union

OUTCOMES = ("completed", "reset", "no_answer")


@dataclass(frozen=True)
class Health:
    policy_generation: int = 1
    reloads: Mapping[str, int] = field(default_factory=dict)
    vm_states: Mapping[str, str] = field(default_factory=dict)  # vm -> state
    actions: Mapping[str, int] = field(default_factory=dict)  # action -> count
    loop_seconds: tuple[tuple[float, ...], float, int] = ((), 0.0, 0)  # buckets, sum, count
    last_loop: float = 0.0  # wall clock of the last detection step
    unattached: int = 0  # VM-facing interfaces the classifier could not be attached to


STATES = ("ok", "flagged", "throttled", "blocked")
LOOP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class DatapathCollector(Collector):
    """Per-VM SMTP counters straight from the kernel's maps. A sample:

        smtpguard_smtp_connection_attempts_total{vm="web1",interface="vnet3",port="25"} 200.0
        smtpguard_smtp_handshakes_total{vm="web1",interface="vnet3",port="25",
                                        outcome="completed"} 198.0
        smtpguard_smtp_destinations{vm="web1",window="1m"} 3.0
        smtpguard_interfaces_attached 12.0
        smtpguard_bpf_program_loaded 1.0
        smtpguard_policy_generation 3.0
        smtpguard_policy_reloads_total{result="rejected"} 1.0

    When the maps cannot be read the per-VM families are left out entirely
    rather than exported half-filled.
    """

    def __init__(self, snapshot: Callable[[], Snapshot],
                 ifaces: Callable[[], Mapping[int, VmIface]],
                 loaded: Callable[[], bool],
                 health: Callable[[], Health] = Health,
                 fill: Callable[[], Mapping[str, tuple[int, int, int]]] | None = None) -> None:
        self._snapshot = snapshot
        self._ifaces = ifaces
        self._loaded = loaded
        self._health = health
        self._fill = fill

    def collect(self) -> Iterator[Metric]:
        yield InfoMetricFamily("smtpguard_build", "Agent build", value={"version": __version__})
        loaded = GaugeMetricFamily("smtpguard_bpf_program_loaded",
                                   "1 when the SMTP classifier is loaded")
        loaded.add_metric([], 1 if self._loaded() else 0)
        yield loaded
        h = self._health()
        yield from self._maps()
        gen = GaugeMetricFamily("smtpguard_policy_generation",
                                "Increases by one each time a reloaded policy is applied")
        gen.add_metric([], h.policy_generation)
        yield gen
        reloads = CounterMetricFamily("smtpguard_policy_reloads",
                                      "Policy reloads by result", labels=["result"])
        for result in ("applied", "rejected"):
            reloads.add_metric([result], h.reloads.get(result, 0))
        yield reloads
        states = GaugeMetricFamily("smtpguard_vm_state", "1 for each VM's current state",
                                   labels=["vm", "state"])
        for vm, st in sorted(h.vm_states.items()):
            for name in STATES:
                states.add_metric([vm, name], 1 if st == name else 0)
        yield states
        actions = CounterMetricFamily(
            "smtpguard_enforcement_actions",
            "Actions taken on VMs (would_*: in audit mode, what would have been done)",
            labels=["action"])
        for name in ("flag", "throttle", "block", "release", "would_flag", "would_throttle",
                     "would_block"):
            actions.add_metric([name], h.actions.get(name, 0))
        yield actions
        beat = GaugeMetricFamily("smtpguard_last_loop_timestamp_seconds",
                                 "When the agent's loop last ran a detection step")
        beat.add_metric([], h.last_loop)
        yield beat
        unatt = GaugeMetricFamily("smtpguard_interfaces_unattached",
                                  "VM-facing interfaces without the classifier (attach failed)")
        unatt.add_metric([], h.unattached)
        yield unatt
        counts, total, n = h.loop_seconds
        if counts:
            loop = HistogramMetricFamily("smtpguard_loop_duration_seconds",
                                         "Duration of the agent's detection steps")
            cum = [(str(b), c) for b, c in zip(LOOP_BUCKETS, counts, strict=False)]
            loop.add_metric([], [*cum, ("+Inf", n)], total)
            yield loop
        ifaces = dict(self._ifaces())
        attached = GaugeMetricFamily("smtpguard_interfaces_attached",
                                     "VM-facing interfaces carrying the classifier")
        attached.add_metric([], len(ifaces))
        yield attached
        info = GaugeMetricFamily(
            "smtpguard_vm_info", "1 per VM on this host: its id (the vm label everywhere), "
            "name, tenant and where the identity came from",
            labels=["vm", "name", "tenant", "source"])
        seen: set[str] = set()
        for v in sorted(ifaces.values(), key=lambda v: v.ifname):
            if v.vm not in seen:
                seen.add(v.vm)
                info.add_metric([v.vm, v.display, v.tenant or "", v.source], 1)
        yield info
        try:
            snap = self._snapshot()
        except Exception:
            logs.get().debug("metrics.read_failed", exc_info=True)
            return
        yield from self._per_vm(snap, ifaces)

    def _per_vm(self, snap: Snapshot, ifaces: Mapping[int, VmIface]) -> Iterator[Metric]:
        labels = ["vm", "interface", "port"]
        attempts = CounterMetricFamily(
            "smtpguard_smtp_connection_attempts",
            "Distinct SMTP connection attempts (retransmitted SYNs excluded)", labels=labels)
        retrans = CounterMetricFamily(
            "smtpguard_smtp_syn_retransmits", "Retransmitted SYNs of counted attempts",
            labels=labels)
        handshakes = CounterMetricFamily(
            "smtpguard_smtp_handshakes", "Attempts by outcome seen on the wire",
            labels=[*labels, "outcome"])
        sent = CounterMetricFamily(
            "smtpguard_smtp_bytes", "Bytes the VM sent to SMTP ports (L2 length)",
            labels=labels)
        dests = GaugeMetricFamily(
            "smtpguard_smtp_destinations",
            "Distinct SMTP destination addresses (sketch: ~2% error to 6,000, 6.5% beyond)",
            labels=["vm", "window"])
        per_vm: dict[str, list[IfaceSnapshot]] = {}
        for ifindex, snap_if in sorted(snap.ifaces.items()):
            vif = ifaces.get(ifindex)
            if vif is None:
                continue  # an interface being forgotten
            for port, c in sorted(snap_if.ports.items()):
                lv = [vif.vm, vif.ifname, str(port)]
                attempts.add_metric(lv, c.attempts)
                # Outcome and retransmit series appear once non-zero: with 1,000
                # VMs the zeros would be most of a scrape's cost.
                if c.retransmits:
                    retrans.add_metric(lv, c.retransmits)
                sent.add_metric(lv, c.bytes)
                for outcome in OUTCOMES:
                    if getattr(c, outcome):
                        handshakes.add_metric([*lv, outcome], getattr(c, outcome))
            per_vm.setdefault(vif.vm, []).append(snap_if)
        for vm, snaps in sorted(per_vm.items()):
            # A VM with several interfaces: the union of their sketches.
            for window, n in sorted(union(snaps).items()):
                dests.add_metric([vm, window], n)
        yield from (attempts, retrans, handshakes, sent, dests)


    def _maps(self) -> Iterator[Metric]:
        """Fill of the classifier's hash maps, and how often one was full:
            smtpguard_bpf_map_entries{map="smtp_stats"} 4000.0
            smtpguard_bpf_map_size{map="smtp_stats"} 32768.0
            smtpguard_bpf_map_full_total{map="smtp_stats"} 0.0"""
        if self._fill is None:
            return
        try:
            fill = self._fill()
        except Exception:
            logs.get().debug("metrics.map_fill_failed", exc_info=True)
            return
        entries = GaugeMetricFamily("smtpguard_bpf_map_entries",
                                    "Entries in each classifier map that can fill up",
                                    labels=["map"])
        size = GaugeMetricFamily("smtpguard_bpf_map_size", "Capacity of each of those maps",
                                 labels=["map"])
        full = CounterMetricFamily(
            "smtpguard_bpf_map_full", "Times the classifier found the map full and skipped "
            "counting (stats) or sketching (dests)", labels=["map"])
        for name, (n, cap, times) in sorted(fill.items()):
            entries.add_metric([name], n)
            size.add_metric([name], cap)
            full.add_metric([name], times)
        yield from (entries, size, full)


class EnforcementCollector(Collector):
    """What nftables rejected, from the counters in our tables. A sample:

        smtpguard_smtp_blocked_attempts_total{vm="web1",interface="vnet3",port="25",
                                              reason="port25"} 12.0
        smtpguard_nft_set_elements{family="bridge",set="seen4"} 12.0
        smtpguard_nft_set_size{family="bridge",set="seen4"} 131072.0
        smtpguard_nft_overflow_total 0.0

    Blocked attempts are distinct attempts: a retransmitted SYN is not counted
    again. Nothing is exported when the tables cannot be read.
    """

    def __init__(self, enforcer: Any, ifaces: Callable[[], Mapping[int, VmIface]],
                 keeper: Any = None) -> None:
        self._enforcer = enforcer
        self._ifaces = ifaces
        self._keeper = keeper

    def collect(self) -> Iterator[Metric]:
        if self._keeper is not None:
            repairs = CounterMetricFamily(
                "smtpguard_enforcement_repairs",
                "Interfaces whose block/throttle in the kernel differed from their VM's "
                "record and were put right (missing, unexpected, changed)", labels=["kind"])
            for kind, n in sorted(self._keeper.repairs.items()):
                repairs.add_metric([kind], n)
            yield repairs
        try:
            counts, fill, overflow = self._enforcer.report()
        except Exception:
            logs.get().debug("metrics.nft_read_failed", exc_info=True)
            return
        vm_of = {v.ifname: v.vm for v in self._ifaces().values()}
        blocked = CounterMetricFamily(
            "smtpguard_smtp_blocked_attempts",
            "SMTP connection attempts rejected by the enforcement, by reason",
            labels=["vm", "interface", "port", "reason"])
        totals: dict[tuple[str, str, str, str], int] = {}
        for c in counts:
            key = (vm_of.get(c.ifname, c.ifname), c.ifname, str(c.port), c.reason)
            totals[key] = totals.get(key, 0) + c.packets
        for key, n in sorted(totals.items()):
            blocked.add_metric(list(key), n)
        yield blocked
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


def parse_addr(addr: str) -> tuple[str, int]:
    """'127.0.0.1:9725', '[::1]:9725' or ':9725' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {addr!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    ipaddress.ip_address(host)
    return host, int(port)


def serve(addr: str, *collectors: Collector) -> Any:
    """Start the /metrics endpoint; returns the HTTP server (its port, for :0)."""
    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
