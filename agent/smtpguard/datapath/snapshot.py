"""Turn map contents into per-interface snapshots that user space reasons on."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from smtpguard.datapath import hll
from smtpguard.datapath.maps import COARSE_SLOT_NS, FINE_SLOT_NS

# window name -> (which tier, slot length, slots merged)
WINDOWS: dict[str, tuple[str, int, int]] = {
    "1m": ("fine", FINE_SLOT_NS, 6),
    "1h": ("coarse", COARSE_SLOT_NS, 12),
}


@dataclass(frozen=True)
class PortCounts:
    attempts: int = 0
    retransmits: int = 0
    completed: int = 0
    reset: int = 0
    no_answer: int = 0
    packets: int = 0
    bytes: int = 0
    last_attempt_ns: int = 0


@dataclass(frozen=True)
class IfaceSnapshot:
    ifindex: int
    ports: Mapping[int, PortCounts] = field(default_factory=dict)
    destinations: Mapping[str, float] = field(default_factory=dict)

    @property
    def attempts(self) -> int:
        return sum(p.attempts for p in self.ports.values())


@dataclass(frozen=True)
class Snapshot:
    taken_ns: int
    ifaces: Mapping[int, IfaceSnapshot]


def _rows(table: Any) -> Iterator[tuple[Any, Any]]:
    """All entries, in one batch syscall where the kernel allows it."""
    try:
        yield from table.items_lookup_batch()
    except Exception:  # older kernels: no batch ops on this map type
        yield from table.items()


def read_ports(table: Any) -> dict[int, dict[int, PortCounts]]:
    out: dict[int, dict[int, PortCounts]] = {}
    for k, v in _rows(table):
        out.setdefault(k.ifindex, {})[k.port] = PortCounts(
            v.attempts, v.retransmits, v.completed, v.reset, v.no_answer,
            v.packets, v.bytes, v.last_attempt_ns,
        )
    return out


def destinations(sketch: Any, now_ns: int) -> dict[str, float]:
    """Distinct destinations per window from one VM's sketch."""
    out = {}
    for window, (tier, slot_ns, n) in WINDOWS.items():
        cur = now_ns // slot_ns
        slots = [list(s.reg) for s in getattr(sketch, tier) if cur - n < s.epoch <= cur]
        out[window] = round(hll.estimate(hll.merge(slots)), 1) if slots else 0.0
    return out


def take(stats: Any, dests: Any, clock: Callable[[], int] = time.monotonic_ns) -> Snapshot:
    """Read both maps once. The clock must be CLOCK_MONOTONIC, like bpf_ktime_get_ns."""
    now = clock()
    ports = read_ports(stats)
    sketches = {k if isinstance(k, int) else k.value: v for k, v in _rows(dests)}
    ifaces = {
        i: IfaceSnapshot(i, ports.get(i, {}), destinations(sketches[i], now) if i in sketches
                         else {w: 0.0 for w in WINDOWS})
        for i in set(ports) | set(sketches)
    }
    return Snapshot(now, ifaces)
