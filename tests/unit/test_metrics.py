"""The exposition format is a contract with dashboards: golden file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from smtpguard import __version__
from smtpguard.datapath import distinct, maps
from smtpguard.datapath.interfaces import VmIface
from smtpguard.datapath.snapshot import IfaceSnapshot, PortCounts, Snapshot, estimates
from smtpguard.metrics import DatapathCollector, parse_addr

GOLDEN = Path(__file__).parent / "golden" / "metrics.txt"


def exposition(snapshot: Snapshot | Exception) -> str:
    def snap() -> Snapshot:
        if isinstance(snapshot, Exception):
            raise snapshot
        return snapshot

    ifaces = {4: VmIface(4, "vnet3", "6f1c2d8e-5b7a-4c3e-9d2f-0a1b2c3d4e5f", "vnet*",
                         "acme", name="web1", source="libvirt"),
              5: VmIface(5, "tap100i0", "100", "x"), 6: VmIface(6, "tap100i1", "100", "x")}
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DatapathCollector(snap, lambda: ifaces, lambda: True))
    return generate_latest(reg).decode().replace(__version__, "VERSION")


def sketch(*dests: str) -> distinct.Sketch:
    s = distinct.Sketch()
    for d in dests:
        distinct.add(s, distinct.addr_hash(maps.addr_bytes(d)))
    return s


def iface(ifindex: int, ports: dict[int, PortCounts], m: list[str], h: list[str]) -> IfaceSnapshot:
    regs = {"1m": sketch(*m), "1h": sketch(*h)}
    return IfaceSnapshot(ifindex, ports, estimates(regs), regs)


MANY = [f"198.19.0.{i}" for i in range(1, 101)]
SNAP = Snapshot(0, {
    4: iface(4, {25: PortCounts(attempts=200, retransmits=3, completed=190, reset=7,
                                no_answer=3, packets=900, bytes=81000)}, MANY[:40], MANY),
    5: iface(5, {587: PortCounts(attempts=2, completed=2, packets=20, bytes=3000)},
             ["198.19.9.1"], ["198.19.9.1"]),
    # VM 100's second interface: same relay and one more; the VM has 2, not 3.
    6: iface(6, {}, ["198.19.9.1"], ["198.19.9.1", "198.19.9.2"]),
    9: iface(9, {25: PortCounts(attempts=5)}, [], []),  # being forgotten: not exported
})


def test_exposition_matches_golden() -> None:
    """Metric names, labels and values change only on purpose
    (regenerate with SMTPGUARD_REGOLD=1)."""
    text = exposition(SNAP)
    if os.environ.get("SMTPGUARD_REGOLD"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_read_failure_exports_no_partial_data() -> None:
    """When the maps cannot be read, per-VM families are absent, health ones stay."""
    text = exposition(OSError("map gone"))
    assert "smtpguard_smtp_" not in text
    assert "smtpguard_bpf_program_loaded 1.0" in text


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
