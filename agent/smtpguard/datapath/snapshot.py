"""Turn map contents into per-interface snapshots that user space reasons on."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from smtpguard.datapath import distinct
from smtpguard.datapath.distinct import Sketch
from smtpguard.datapath.maps import (
    COARSE_SLOT_SHIFT,
    FINE_SLOT_SHIFT,
    SmtpKey,
    SmtpStats,
    slot_epoch,
)

# window name -> (which tier, slot length as a shift of ns, slots merged):
# the current slot and the full ones before it, 51-60 s and 55-60 min.
WINDOWS: dict[str, tuple[str, int, int]] = {
    "1m": ("fine", FINE_SLOT_SHIFT, 7),
    "1h": ("coarse", COARSE_SLOT_SHIFT, 13),
}


class PortCounts(NamedTuple):
    """One (interface, port) entry of smtp_stats (a tuple: thousands are
    decoded every detection step and scrape)."""

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
    # window -> sketch merged over its slots, so interfaces of one VM can be united
    sketches: Mapping[str, Sketch] = field(default_factory=dict, repr=False)

    @property
    def attempts(self) -> int:
        return sum(p.attempts for p in self.ports.values())


@dataclass(frozen=True)
class Snapshot:
    taken_ns: int
    ifaces: Mapping[int, IfaceSnapshot]


# struct smtp_key and struct smtp_stats (bpf/smtp_common.h), as maps.py has them.
_KEY = struct.Struct("=IHxx")
_STATS = struct.Struct("=8Q")


def read_ports(table: Any) -> dict[int, dict[int, PortCounts]]:
    """ifindex -> port -> counts, from the smtp_stats map (a PinnedMap is
    decoded from its batch buffers; anything else item by item)."""
    out: dict[int, dict[int, PortCounts]] = {}
    batches = getattr(table, "batches", None)
    if batches is None or table.Key is not SmtpKey or table.Leaf is not SmtpStats:
        for k, v in table.items():
            out.setdefault(k.ifindex, {})[k.port] = PortCounts(
                v.attempts, v.retransmits, v.completed, v.reset, v.no_answer,
                v.packets, v.bytes, v.last_attempt_ns,
            )
        return out
    make = PortCounts._make
    for keys, values, n in batches():
        kb = memoryview(keys).cast("B")[:n * _KEY.size]
        vb = memoryview(values).cast("B")[:n * _STATS.size]
        for (ifindex, port), v in zip(_KEY.iter_unpack(kb), _STATS.iter_unpack(vb), strict=True):
            out.setdefault(ifindex, {})[port] = make(v)
    return out


def _in_window(slot: Any, cur: int, n: int) -> bool:
    """The slot was written in one of the n epochs up to cur."""
    e = slot_epoch(slot.epoch)
    return e is not None and cur - n < e <= cur


def window_sketches(sketch: Any, now_ns: int) -> dict[str, Sketch]:
    """One interface's sketch, merged over the slots inside each window."""
    out = {}
    for window, (tier, shift, n) in WINDOWS.items():
        cur = now_ns >> shift
        out[window] = distinct.merge(distinct.from_slot(s) for s in getattr(sketch, tier)
                                     if _in_window(s, cur, n))
    return out


def estimates(sketches: Mapping[str, Sketch]) -> dict[str, float]:
    return {w: round(distinct.estimate(s), 1) for w, s in sketches.items()}


def union(snaps: Iterable[IfaceSnapshot]) -> dict[str, float]:
    """Distinct destinations of several interfaces together (one VM's)."""
    merged: dict[str, list[Sketch]] = {w: [] for w in WINDOWS}
    for s in snaps:
        for w, sk in s.sketches.items():  # none for an idle interface
            merged.setdefault(w, []).append(sk)
    return {w: round(distinct.estimate(distinct.merge(r)), 1) for w, r in merged.items()}


# An interface whose newest attempt is older than this has nothing left in
# any window's slots (13 coarse slots, and one for the slot edge).
SKETCH_HORIZON_NS = max((n + 1) << shift for _tier, shift, n in WINDOWS.values())


def take(stats: Any, dests: Any, clock: Callable[[], int] = time.monotonic_ns,
         every_sketch: bool = False,
         ktime: Callable[[], int] = time.monotonic_ns) -> Snapshot:
    """Read both maps once. The clock must be CLOCK_MONOTONIC (the classifier
    stamps with its coarse form, the time of the last tick).

    Sketches are decoded only for interfaces with an attempt (last_attempt_ns,
    the classifier's own unshifted clock: ktime) within SKETCH_HORIZON_NS: an
    idle one's windows are empty, and decoding 1,000 idle VMs' sketches was
    most of a scrape. every_sketch decodes them all, as before."""
    now = clock()
    ports = read_ports(stats)
    if every_sketch:
        raw = {k if isinstance(k, int) else k.value: v for k, v in dests.items()}
    else:
        since = ktime() - SKETCH_HORIZON_NS
        recent = [i for i, pc in ports.items()
                  if max(c.last_attempt_ns for c in pc.values()) >= since]
        # One lookup each: a batch read sizes its buffer for thousands of
        # sketches (19 ms for 50 of them, measured), 1,000 lookups take less.
        raw = {i: v for i in recent if (v := read_sketch(dests, i)) is not None}
    none = estimates({w: Sketch() for w in WINDOWS})  # shared: read only
    ifaces = {}
    for i in set(ports) | set(raw):
        if i in raw:
            regs = window_sketches(raw[i], now)
            ifaces[i] = IfaceSnapshot(i, ports.get(i, {}), estimates(regs), regs)
        else:
            ifaces[i] = IfaceSnapshot(i, ports.get(i, {}), none)  # no sketches: nothing in them
    return Snapshot(now, ifaces)


def read_sketch(dests: Any, ifindex: int) -> Any | None:
    """One interface's raw sketch (ctypes DestSketch), or None."""
    try:
        return dests[dests.Key(ifindex)]
    except KeyError:
        return None


def sketch_over(sketch: Any, now_ns: int, window_s: float, since_ns: int = 0) -> Sketch:
    """Merge the slots that lie within the last window_s seconds and start at
    or after since_ns: the fine tier (8.6 s slots) for windows up to a minute,
    the coarse one (4.6 min) beyond. Slot granularity rounds the window up; a
    slot that began before since_ns is left out whole (the cooling-off)."""
    tier, shift = ("fine", FINE_SLOT_SHIFT) if window_s <= 60 else ("coarse", COARSE_SLOT_SHIFT)
    slot_ns = 1 << shift
    cur = now_ns >> shift
    n = max(1, -(-int(window_s * 1e9) // slot_ns))  # ceil
    return distinct.merge(
        distinct.from_slot(s) for s in getattr(sketch, tier)
        if _in_window(s, cur, n) and (slot_epoch(s.epoch) or 0) << shift >= since_ns)
