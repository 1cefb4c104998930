"""The exposition format is a contract with dashboards: golden file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from smtpguard import __version__
from smtpguard.datapath import distinct, maps
from smtpguard.datapath.snapshot import IfaceSnapshot, PortCounts, Snapshot, estimates
from smtpguard.enforce.nftables import BlockedCount
from smtpguard.inventory.vmiface import VmIface
from smtpguard.observe.datapath_metrics import DatapathCollector
from smtpguard.observe.enforcement_metrics import EnforcementCollector
from smtpguard.observe.metrics import Health, parse_addr
from smtpguard.policy import Policy
from smtpguard.policy.model import Metrics

GOLDEN = Path(__file__).parent / "golden" / "metrics.txt"
S = 1_000_000_000
NOW = 10_000 * S  # the snapshots' CLOCK_MONOTONIC
IFACES = {4: VmIface(4, "vnet3", "6f1c2d8e-5b7a-4c3e-9d2f-0a1b2c3d4e5f", "vnet*", "acme",
                     name="web1", source="libvirt"),
          5: VmIface(5, "tap100i0", "100", "x"), 6: VmIface(6, "tap100i1", "100", "x"),
          7: VmIface(7, "vnet7", "idle7", "vnet*", "acme"),
          8: VmIface(8, "vnet8", "quiet8", "vnet*")}


def collector(snapshot: Callable[[], Snapshot], states: dict[str, str] | None = None,
              window: float = 3600.0) -> DatapathCollector:
    health = Health(vm_states=states or {})
    policy = Policy(metrics=Metrics(active_within=window))
    return DatapathCollector(snapshot, lambda: IFACES, lambda: True, lambda: health,
                             policy=lambda: policy)


def scrape(*collectors: Collector) -> str:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return generate_latest(reg).decode().replace(__version__, "VERSION")


def series(text: str) -> dict[str, float]:
    """'name{labels}' -> value, the way Prometheus would store them."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}"] = smp.value
    return out


def sketch(*dests: str) -> distinct.Sketch:
    s = distinct.Sketch()
    for d in dests:
        distinct.add(s, distinct.addr_hash(maps.addr_bytes(d)))
    return s


def iface(ifindex: int, ports: dict[int, PortCounts], m: list[str], h: list[str]) -> IfaceSnapshot:
    regs = {"1m": sketch(*m), "1h": sketch(*h)}
    return IfaceSnapshot(ifindex, ports, estimates(regs), regs)


def at(seconds_ago: float, **counts: int) -> PortCounts:
    """Counts whose newest attempt was this long before NOW."""
    return PortCounts(last_attempt_ns=NOW - int(seconds_ago * S), **counts)


MANY = [f"198.19.0.{i}" for i in range(1, 101)]


def snapshot(web1: int = 200, idle7: int = 40, taken: int = NOW) -> Snapshot:
    return Snapshot(taken, {
        4: iface(4, {25: at(5, attempts=web1, retransmits=3, completed=web1 - 10, reset=7,
                            no_answer=3, packets=900, bytes=81000)}, MANY[:40], MANY),
        5: iface(5, {587: at(1800, attempts=2, completed=2, packets=20, bytes=3000)},
                 ["198.19.9.1"], ["198.19.9.1"]),
        # VM 100's second interface: same relay and one more; the VM has 2, not 3.
        6: iface(6, {}, ["198.19.9.1"], ["198.19.9.1", "198.19.9.2"]),
        # Sent 40 attempts two hours ago: idle, nothing of its own exported.
        7: iface(7, {25: at(7200, attempts=idle7, completed=idle7)}, [], []),
        8: iface(8, {}, [], []),  # never sent
        9: iface(9, {25: at(5, attempts=5)}, [], []),  # being forgotten: not per VM
    })


SNAP = snapshot()


def exposition(snap: Snapshot | Exception) -> str:
    def read() -> Snapshot:
        if isinstance(snap, Exception):
            raise snap
        return snap

    return scrape(collector(read))


def test_exposition_matches_golden() -> None:
    """Metric names, labels and values change only on purpose
    (regenerate with SMTPGUARD_REGOLD=1). The second of two scrapes: host
    totals count what changed since the first."""
    snaps = iter([snapshot(web1=150, idle7=40, taken=NOW - 60 * S), SNAP])
    c = collector(lambda: next(snaps), {"6f1c2d8e-5b7a-4c3e-9d2f-0a1b2c3d4e5f": "flagged",
                                        "100": "ok", "idle7": "ok", "quiet8": "ok"})
    scrape(c)
    text = scrape(c)
    if os.environ.get("SMTPGUARD_REGOLD") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_an_idle_vm_exports_nothing_per_vm_and_the_host_totals_cover_it() -> None:
    """A VM without an SMTP attempt within the window has no series with its
    vm label (no state, no info, no counters); the host's totals and VM count
    include it."""
    s = series(exposition(SNAP))
    for vm in ("idle7", "quiet8"):
        assert not [k for k in s if f'vm="{vm}"' in k], vm
    assert s['smtpguard_host_vms_sending{}'] == 2  # web1 and VM 100
    assert s['smtpguard_vm_info{name="100",source="pattern",tenant="",vm="100"}'] == 1
    assert s['smtpguard_smtp_connection_attempts_total{interface="tap100i0",port="587",'
             'vm="100"}'] == 2
    assert 'smtpguard_host_smtp_connection_attempts_total{port="25"}' in s
    # The window exported is the policy's (its default here), not a figure of its own.
    assert s['smtpguard_metrics_active_within_seconds{}'] == Policy().metrics.active_within


def test_a_shorter_window_drops_vms_that_sent_before_it() -> None:
    """VM 100 last sent 30 minutes ago: inside 1h, outside 10m."""
    s = series(scrape(collector(lambda: SNAP, window=600)))
    assert not [k for k in s if 'vm="100"' in k]
    assert [k for k in s if 'vm="6f1c2d8e-5b7a-4c3e-9d2f-0a1b2c3d4e5f"' in k]
    assert s['smtpguard_host_vms_sending{}'] == 1


def test_a_vm_not_ok_keeps_its_state_and_info_while_idle() -> None:
    """A blocked VM that stopped trying is still on the dashboards and alerts."""
    s = series(scrape(collector(lambda: SNAP, {"idle7": "blocked", "quiet8": "ok",
                                              "100": "ok"})))
    assert s['smtpguard_vm_state{state="blocked",vm="idle7"}'] == 1
    assert s['smtpguard_vm_info{name="idle7",source="pattern",tenant="acme",vm="idle7"}'] == 1
    assert s['smtpguard_smtp_connection_attempts_total{interface="vnet7",port="25",'
             'vm="idle7"}'] == 40
    assert not [k for k in s if 'vm="quiet8"' in k]
    assert s['smtpguard_host_vms{state="blocked"}'] == 1
    assert s['smtpguard_host_vms{state="ok"}'] == 2


def test_a_vm_that_comes_back_resumes_its_counters_higher() -> None:
    """Idle, its series vanish; back, they reappear at the kernel's figure,
    never lower than before (Prometheus takes a lower value for a reset)."""
    key = 'smtpguard_smtp_connection_attempts_total{interface="vnet7",port="25",vm="idle7"}'
    ago = 7200.0

    def snap() -> Snapshot:
        return Snapshot(NOW, {7: iface(7, {25: at(ago, attempts=40 + int(ago == 1))}, [], [])})

    c = collector(snap)
    assert key not in series(scrape(c))
    ago = 1
    assert series(scrape(c))[key] == 41


def test_host_totals_never_go_down() -> None:
    """Host totals keep what a forgotten interface had counted, and survive an
    entry recreated at zero; they start at the first scrape."""
    frames = [
        {4: PortCounts(attempts=100), 5: PortCounts(attempts=10)},
        {4: PortCounts(attempts=130), 5: PortCounts(attempts=12)},
        {4: PortCounts(attempts=135)},  # interface 5 forgotten
        {4: PortCounts(attempts=3)},  # interface 4's entry recreated
        {4: PortCounts(attempts=9), 6: PortCounts(attempts=4)},  # a new interface
    ]
    snaps = iter(Snapshot(NOW, {i: IfaceSnapshot(i, {25: c}) for i, c in f.items()})
                 for f in frames)
    c = collector(lambda: next(snaps))
    seen = [series(scrape(c))['smtpguard_host_smtp_connection_attempts_total{port="25"}']
            for _ in frames]
    assert seen == [0, 32, 37, 40, 50]


def test_host_totals_are_there_at_zero_before_any_attempt() -> None:
    """Every SMTP port's host totals exist from the first scrape, so the first
    attempts on a port are an increase to Prometheus, not the first sample of
    a new series (which rate() cannot see)."""
    s = series(scrape(collector(lambda: Snapshot(NOW, {}))))
    for port in Policy().smtp_ports:
        assert s[f'smtpguard_host_smtp_connection_attempts_total{{port="{port}"}}'] == 0
        assert s[f'smtpguard_host_smtp_handshakes_total{{outcome="reset",port="{port}"}}'] == 0
    assert s['smtpguard_host_vms_sending{}'] == 0


def test_read_failure_exports_no_partial_data() -> None:
    """When the maps cannot be read, the SMTP families (per VM and per host)
    are absent, health ones stay."""
    text = exposition(OSError("map gone"))
    assert "smtpguard_smtp_" not in text and "smtpguard_host_smtp_" not in text
    assert "smtpguard_bpf_program_loaded 1.0" in text


class Reporting:
    """An enforcer's report(), from a list that the test changes."""

    def __init__(self) -> None:
        self.counts: list[BlockedCount] = []

    def report(self) -> tuple[list[BlockedCount], dict[tuple[str, str], tuple[int, int]], int]:
        return list(self.counts), {("bridge", "seen4"): (3, 131072)}, 0


def test_blocked_attempts_follow_the_same_rule() -> None:
    """Per VM only for the VMs the datapath exports (read one scrape later);
    the host's blocked total counts every interface and never goes down."""
    enf = Reporting()
    dp = collector(lambda: SNAP)
    nft = EnforcementCollector(enf, lambda: IFACES, activity=dp.activity)
    enf.counts = [BlockedCount("bridge", "port25", "vnet3", 25, 10),
                  BlockedCount("bridge", "port25", "vnet7", 25, 4)]
    scrape(nft, dp)
    enf.counts = [BlockedCount("bridge", "port25", "vnet3", 25, 12),
                  BlockedCount("inet", "port25", "vnet7", 25, 1)]
    s = series(scrape(nft, dp))
    assert s['smtpguard_smtp_blocked_attempts_total{interface="vnet3",port="25",'
             'reason="port25",vm="6f1c2d8e-5b7a-4c3e-9d2f-0a1b2c3d4e5f"}'] == 12
    assert not [k for k in s if 'vm="idle7"' in k]
    # vnet3 +2, vnet7's bridge counter gone (kept: +0), its inet one new (+1).
    assert s['smtpguard_host_smtp_blocked_attempts_total{port="25",reason="port25"}'] == 3
    assert s['smtpguard_host_smtp_blocked_attempts_total{port="587",reason="limit"}'] == 0


@pytest.mark.parametrize(("addr", "want"), [
    ("127.0.0.1:9725", ("127.0.0.1", 9725)), ("[::1]:9725", ("::1", 9725)),
    (":9725", ("127.0.0.1", 9725)),
])
def test_parse_addr(addr: str, want: tuple[str, int]) -> None:
    assert parse_addr(addr) == want


@pytest.mark.parametrize("addr", ["9725", "localhost:9725", "1.2.3.4:x"])
def test_parse_addr_rejects(addr: str) -> None:
    with pytest.raises(ValueError):
        parse_addr(addr)
