"""The datapath's collector: SMTP counters read from the BPF maps at scrape time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from smtpguard import __version__, logs
from smtpguard.datapath.snapshot import IfaceSnapshot, PortCounts, Snapshot, union
from smtpguard.inventory.vmiface import VmIface
from smtpguard.observe.metrics import (
    LOOP_BUCKETS,
    OUTCOMES,
    STATES,
    UNCOVERED,
    Activity,
    Health,
    Totals,
)
from smtpguard.policy import Policy


class DatapathCollector(Collector):
    """SMTP counters straight from the kernel's maps: per VM for the VMs that
    sent within the window (or are not ok), per host always. A sample:

        smtpguard_smtp_connection_attempts_total{vm="web1",interface="vnet3",port="25"} 200.0
        smtpguard_smtp_handshakes_total{vm="web1",interface="vnet3",port="25",
                                        outcome="completed"} 198.0
        smtpguard_smtp_destinations{vm="web1",window="1m"} 3.0
        smtpguard_host_smtp_connection_attempts_total{port="25"} 4200.0
        smtpguard_host_vms{state="ok"} 998.0
        smtpguard_host_vms_sending 50.0
        smtpguard_interfaces_attached 12.0
        smtpguard_vms_uncovered{reason="vhost-user"} 1.0
        smtpguard_bpf_program_loaded 1.0
        smtpguard_policy_generation 3.0
        smtpguard_policy_reloads_total{result="rejected"} 1.0

    When the maps cannot be read the SMTP families (per VM and per host) are
    left out entirely rather than exported half-filled, and only the VMs not
    in state ok keep their vm_state and vm_info.
    """

    def __init__(self, snapshot: Callable[[], Snapshot],
                 ifaces: Callable[[], Mapping[int, VmIface]],
                 loaded: Callable[[], bool],
                 health: Callable[[], Health] = Health,
                 fill: Callable[[], Mapping[str, tuple[int, int, int]]] | None = None,
                 policy: Callable[[], Policy] = Policy,
                 activity: Activity | None = None) -> None:
        self._snapshot = snapshot
        self._ifaces = ifaces
        self._loaded = loaded
        self._health = health
        self._fill = fill
        self._policy = policy
        self.activity = activity or Activity()
        self.activity.prepare = self.prepare
        self._lock = threading.Lock()  # scrapes may overlap: totals in read order
        self._totals: Totals[int] = Totals()
        self._prepared: tuple[float, Snapshot | None, tuple[set[str], int]] | None = None

    def _read(self) -> Snapshot | None:
        try:
            return self._snapshot()
        except Exception:
            logs.get().debug("metrics.read_failed", exc_info=True)
            return None

    def prepare(self) -> None:
        """Read the maps now, for the scrape under way (after the enforcement
        counters: a SYN is counted before it can be rejected), and decide who
        is exported from that read."""
        with self._lock:
            snap = self._read()
            ifaces, pol, h = dict(self._ifaces()), self._policy(), self._health()
            self._prepared = (time.monotonic(), snap, self._decide(snap, ifaces, pol, h))

    def _decide(self, snap: Snapshot | None, ifaces: dict[int, VmIface], pol: Policy,
                h: Health) -> tuple[set[str], int]:
        """(the VMs exported per VM, how many of them sent within the window)."""
        sending, counted = (set(), set()) if snap is None else self._sending(
            snap, ifaces, pol.metrics.active_within)
        noted = sending | {vm for vm, st in h.vm_states.items() if st != "ok"}
        self.activity.ports = pol.smtp_ports
        self.activity.exported = frozenset(noted)
        if snap is not None:
            self.activity.counted = frozenset(counted)
        return noted, len(sending)

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
        ifaces = dict(self._ifaces())
        pol = self._policy()
        with self._lock:
            prepared, self._prepared = self._prepared, None
            # This scrape's read and decision if prepare() made them (moments ago),
            # else both now.
            if prepared is not None and time.monotonic() - prepared[0] < 5:
                snap, (noted, sending) = prepared[1], prepared[2]
            else:
                snap = self._read()
                noted, sending = self._decide(snap, ifaces, pol, h)
            host = None if snap is None else self._host(snap)
        yield from self._states(h, noted)
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
        unc = GaugeMetricFamily(
            "smtpguard_vms_uncovered", "VMs whose traffic bypasses the host kernel "
            "(vhost-user, a passed-through VF, vDPA): nothing is counted "
            "or enforced for them on this host", labels=["reason"])
        for reason in sorted({*UNCOVERED, *h.uncovered}):
            unc.add_metric([reason], h.uncovered.get(reason, 0))
        yield unc
        unenf = GaugeMetricFamily(
            "smtpguard_interfaces_unenforced", "VM interfaces counted but out of the "
            "enforcement backend's reach (iptables: Open vSwitch ports, macvtaps)",
            labels=["attachment"])
        for att, n in sorted(h.unenforced.items()):
            unenf.add_metric([att], n)
        yield unenf
        counts, total, n = h.loop_seconds
        if counts:
            loop = HistogramMetricFamily("smtpguard_loop_duration_seconds",
                                         "Duration of the agent's detection steps")
            cum = [(str(b), c) for b, c in zip(LOOP_BUCKETS, counts, strict=False)]
            loop.add_metric([], [*cum, ("+Inf", n)], total)
            yield loop
        attached = GaugeMetricFamily("smtpguard_interfaces_attached",
                                     "VM-facing interfaces carrying the classifier")
        attached.add_metric([], len(ifaces))
        yield attached
        info = GaugeMetricFamily(
            "smtpguard_vm_info", "1 per VM on this host with per-VM series (it sent SMTP "
            "within the window, or is not ok): its id (the vm label everywhere), "
            "name, tenant and where the identity came from",
            labels=["vm", "name", "tenant", "source"])
        seen: set[str] = set()
        for v in sorted(ifaces.values(), key=lambda v: v.ifname):
            if v.vm not in seen and v.vm in noted:
                seen.add(v.vm)
                info.add_metric([v.vm, v.display, v.tenant or "", v.source], 1)
        yield info
        win = GaugeMetricFamily(
            "smtpguard_metrics_active_within_seconds",
            "VMs with an SMTP attempt within this many seconds are exported per VM")
        win.add_metric([], pol.metrics.active_within)
        yield win
        if snap is None or host is None:
            return
        vms = GaugeMetricFamily("smtpguard_host_vms_sending",
                                "VMs on this host with an SMTP attempt within the window")
        vms.add_metric([], sending)
        yield vms
        yield from host
        yield from self._per_vm(snap, ifaces, noted)

    @staticmethod
    def _sending(snap: Snapshot, ifaces: Mapping[int, VmIface],
                 window: float) -> tuple[set[str], set[str]]:
        """(VMs with an attempt on any of their interfaces within the window,
        VMs with an attempt at all), in one pass over the read."""
        since = snap.taken_ns - int(window * 1e9)
        sending, counted = set(), set()
        for ifindex, s in snap.ifaces.items():
            vif = ifaces.get(ifindex)
            if vif is None or vif.vm in sending:
                continue
            for c in s.ports.values():
                if c.attempts:
                    counted.add(vif.vm)
                    if c.last_attempt_ns >= since:
                        sending.add(vif.vm)
                        break
        return sending, counted

    def _states(self, h: Health, noted: set[str]) -> Iterator[Metric]:
        states = GaugeMetricFamily("smtpguard_vm_state", "1 for each VM's current state "
                                   "(VMs with per-VM series only)", labels=["vm", "state"])
        by_state = dict.fromkeys(STATES, 0)
        for vm, st in sorted(h.vm_states.items()):
            by_state[st] = by_state.get(st, 0) + 1
            if vm in noted:
                for name in STATES:
                    states.add_metric([vm, name], 1 if st == name else 0)
        yield states
        host = GaugeMetricFamily("smtpguard_host_vms", "VMs on this host by state (all of them)",
                                 labels=["state"])
        for name, n in by_state.items():
            host.add_metric([name], n)
        yield host

    def _host(self, snap: Snapshot) -> list[Metric]:
        """Totals over every interface the kernel counts for (called under the lock)."""
        attempts = CounterMetricFamily(
            "smtpguard_host_smtp_connection_attempts",
            "Distinct SMTP connection attempts of all VMs on this host, since the agent started",
            labels=["port"])
        handshakes = CounterMetricFamily(
            "smtpguard_host_smtp_handshakes",
            "Attempts of all VMs on this host by outcome, since the agent started",
            labels=["port", "outcome"])
        sent = CounterMetricFamily(
            "smtpguard_host_smtp_bytes",
            "Bytes all VMs on this host sent to SMTP ports, since the agent started",
            labels=["port"])
        dests = GaugeMetricFamily(
            "smtpguard_host_smtp_destinations",
            "Distinct SMTP destination addresses of all VMs on this host together (sketch)",
            labels=["window"])

        # Each entry's whole PortCounts (a tuple, compared as it is: most
        # entries are unchanged most scrapes); last_attempt_ns is summed too
        # and never exported.
        entries = ((port, (ifindex, port), c) for ifindex, s in snap.ifaces.items()
                   for port, c in s.ports.items())
        totals = self._totals.update(entries, self.activity.ports, len(PortCounts._fields))
        for port, sums in sorted(totals.items()):
            c = PortCounts._make(sums)
            attempts.add_metric([str(port)], c.attempts)
            sent.add_metric([str(port)], c.bytes)
            for outcome in OUTCOMES:
                handshakes.add_metric([str(port), outcome], getattr(c, outcome))
        for window, d in sorted(union(snap.ifaces.values()).items()):
            dests.add_metric([window], d)
        return [attempts, handshakes, sent, dests]

    def _per_vm(self, snap: Snapshot, ifaces: Mapping[int, VmIface],
                noted: set[str]) -> Iterator[Metric]:
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
            if vif is None or vif.vm not in noted:
                continue  # an interface being forgotten, or an idle VM's
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
