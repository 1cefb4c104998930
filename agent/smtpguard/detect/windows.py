"""Sliding windows over cumulative per-VM counters, memory bounded per VM.

Each VM keeps samples of its cumulative counters in three tiers: every
sample for the last 2 minutes, one per 10 s for 70 minutes, one per 5 min
for 25 hours (at most ~840 samples a VM). A window's value is the counter now
minus the counter at the window's start, read from the newest sample at or
before it: exact to the sampling interval for windows up to 2 minutes, to
10 s up to an hour, to 5 minutes up to a day.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

METRICS = ("attempts", "blocked_attempts", "failed_handshakes")
TIERS = ((0.0, 120.0), (10.0, 4200.0), (300.0, 90000.0))  # (spacing, span) seconds


@dataclass
class _Tier:
    spacing: float
    span: float
    samples: deque[tuple[float, tuple[int, ...]]] = field(default_factory=deque)


class VmWindows:
    def __init__(self) -> None:
        self.tiers = [_Tier(s, span) for s, span in TIERS]
        self.last: tuple[float, tuple[int, ...]] | None = None
        self.unchanged_at = 0.0  # last update that found the values unchanged

    def add(self, t: float, values: tuple[int, ...]) -> None:
        if self.last is not None and any(v < o for v, o in zip(values, self.last[1],
                                                                strict=True)):
            # A counter went down (an interface was forgotten): start over.
            for tier in self.tiers:
                tier.samples.clear()
        self.last = (t, values)
        for tier in self.tiers:
            if not tier.samples or t - tier.samples[-1][0] >= tier.spacing:
                tier.samples.append((t, values))
            while tier.samples and t - tier.samples[0][0] > tier.span:
                tier.samples.popleft()

    def at(self, t: float) -> tuple[float, tuple[int, ...]] | None:
        """The newest sample at or before t, else the oldest one kept."""
        best = None
        for tier in self.tiers:
            for s in reversed(tier.samples):
                if s[0] <= t:
                    if best is None or s[0] > best[0]:
                        best = s
                    break
        if best is not None:
            return best
        oldest = [tier.samples[0] for tier in self.tiers if tier.samples]
        return min(oldest) if oldest else None

    def value(self, metric: str, window: float, now: float, since: float = 0.0) -> int:
        """Growth of `metric` over the window (not before `since`)."""
        if self.last is None:
            return 0
        i = METRICS.index(metric)
        start = self.at(max(now - window, since))
        return 0 if start is None else max(0, self.last[1][i] - start[1][i])

    def __len__(self) -> int:
        return sum(len(t.samples) for t in self.tiers)


class Windows:
    """All VMs' windows; VMs not seen in a snapshot are dropped."""

    def __init__(self) -> None:
        self.vms: dict[str, VmWindows] = {}

    def update(self, t: float, totals: dict[str, tuple[int, ...]]) -> None:
        for vm in set(self.vms) - set(totals):
            del self.vms[vm]
        for vm, values in totals.items():
            w = self.vms.setdefault(vm, VmWindows())
            if w.last is not None and w.last[1] == values:
                # Unchanged: no sample (most VMs, most of the time). The last
                # time it was seen so is recorded when the counter moves on.
                w.unchanged_at = t
                continue
            if w.last is not None and w.unchanged_at > w.last[0]:
                w.add(w.unchanged_at, w.last[1])
            w.add(t, values)

    def value(self, vm: str, metric: str, window: float, now: float, since: float = 0.0) -> int:
        w = self.vms.get(vm)
        return 0 if w is None else w.value(metric, window, now, since)
