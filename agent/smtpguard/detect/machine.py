"""The per-VM state machine: (record, class policy, figures, offences, clock)
-> (new record, transitions). Pure: no kernel, no store, no wall clock of
its own, so every path is unit-tested.

    ok -> flagged -> throttled -> blocked -> ok
          (any step up can be skipped; a block or throttle ends on time)

- The strongest action among the thresholds that fire wins; a VM only
  moves up (a flagged VM that crosses a block threshold is blocked).
- A block lasts the threshold's duration times escalation.factor for each
  earlier block within escalation.forget_after, capped at escalation.max.
- When a block or throttle ends, the VM starts afresh: windows only count
  what it does afterwards (the cooling-off), so the figures that caused the
  block cannot re-trigger it.
- A flag clears once no flag threshold has fired for the longest fired window.
- An operator's block or release wins over automatic decisions until it
  expires (a release grants that long an immunity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from smtpguard.policy.classes import Threshold, VmClass
from smtpguard.policy.units import format_duration

RANK = {"ok": 0, "flagged": 1, "throttled": 2, "blocked": 3}
ACTION_STATE = {"flag": "flagged", "throttle": "throttled", "block": "blocked"}
EVENT = {"ok": "vm.released", "flagged": "vm.flagged", "throttled": "vm.throttled",
         "blocked": "vm.blocked"}


@dataclass(frozen=True)
class VmRecord:
    """A VM's detection state, as stored."""

    vm: str
    state: str = "ok"
    since: float = 0.0
    until: float | None = None  # end of a throttle or block (wall clock)
    reason: str = ""
    actor: str = "auto"  # "auto" or "operator:<who>"
    manual_until: float | None = None  # an operator's decision rules until then
    flagged_until: float | None = None
    baseline: float = 0.0  # windows count only what happened after this


@dataclass(frozen=True)
class Transition:
    vm: str
    old: str
    new: str
    at: float
    until: float | None
    reason: str
    actor: str
    threshold: str | None = None
    figures: dict[str, float] = field(default_factory=dict)
    offence: int = 0  # the how-manieth block within forget_after (1 = first)

    @property
    def event(self) -> str:
        return EVENT[self.new]


Figure = Callable[[Threshold, float], float]  # (threshold, since) -> value



def figure_text(metric: str, value: float) -> str:
    """A figure as people read it: distinct destinations are an estimate
    (a sketch's, within a few percent) and read `~112`; counts are exact."""
    if metric == "destinations":
        return f"~{round(value)}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:g}"


def reason_text(t: Threshold, value: float) -> str:
    """e.g. `fanout: destinations ~112 >= 100 in 1m`."""
    return (f"{t.label}: {t.metric} {figure_text(t.metric, value)} >= {t.at_least} "
            f"in {format_duration(t.window)}")

def block_duration(t: Threshold, cls: VmClass, earlier_blocks: int) -> float:
    """The escalated duration of a block: base x factor^earlier, capped."""
    assert t.duration is not None
    esc = cls.escalation
    return float(min(t.duration * esc.factor ** earlier_blocks, max(esc.max, t.duration)))


def _fired(cls: VmClass, figure: Figure, since: float) -> list[tuple[Threshold, float]]:
    out = []
    for t in cls.thresholds:
        v = figure(t, since)
        if v >= t.at_least:
            out.append((t, v))
    return out


def _strongest(fired: list[tuple[Threshold, float]]) -> tuple[Threshold, float]:
    order = {"flag": 1, "throttle": 2, "block": 3}
    return max(fired, key=lambda f: (order[f[0].action], f[1] / f[0].at_least))


def decide(rec: VmRecord, cls: VmClass, figure: Figure, blocks_at: Sequence[float],
           now: float) -> tuple[VmRecord, list[Transition]]:
    """One step for one VM. `blocks_at`: times of its earlier blocks."""
    out: list[Transition] = []

    def move(new: str, reason: str, until: float | None = None, threshold: str | None = None,
             figures: dict[str, float] | None = None, offence: int = 0) -> None:
        nonlocal rec
        out.append(Transition(rec.vm, rec.state, new, now, until, reason, "auto", threshold,
                              figures or {}, offence))
        rec = replace(rec, state=new, since=now, until=until, reason=reason, actor="auto")

    # 1. What ends by itself.
    if rec.manual_until is not None and now >= rec.manual_until:
        rec = replace(rec, manual_until=None)
    if rec.state in ("blocked", "throttled") and rec.until is not None and now >= rec.until:
        move("ok", {"blocked": "block expired", "throttled": "throttle expired"}[rec.state])
        rec = replace(rec, baseline=now, flagged_until=None)
    # 2. An operator's decision rules until it expires.
    if rec.manual_until is not None or (rec.actor.startswith("operator") and
                                        rec.state in ("blocked", "throttled") and
                                        rec.until is None):
        return rec, out
    fired = _fired(cls, figure, rec.baseline)
    # 3. Clearing: flags cool off, open-ended throttles end when quiet.
    if rec.state == "flagged" and rec.flagged_until is not None and now >= rec.flagged_until \
            and not fired:
        move("ok", "flag cleared: quiet for its window")
        rec = replace(rec, flagged_until=None)
    if rec.state == "throttled" and rec.until is None and not any(
            t.action in ("throttle", "block") for t, _ in fired):
        move("ok", "throttle lifted: below its thresholds")
        rec = replace(rec, baseline=now)
        fired = []
    if not fired:
        return rec, out
    # 4. Moving up.
    t, value = _strongest(fired)
    new = ACTION_STATE[t.action]
    figures = {f.label: v for f, v in fired}
    reason = reason_text(t, value)
    flag_for = max((f.window for f, _ in fired if f.action == "flag"), default=t.window)
    if RANK[new] > RANK[rec.state]:
        if new == "blocked":
            recent = [b for b in blocks_at if now - b <= cls.escalation.forget_after]
            duration = block_duration(t, cls, len(recent))
            move(new, reason, until=now + duration, threshold=t.label, figures=figures,
                 offence=len(recent) + 1)
        elif new == "throttled":
            move(new, reason, until=None if t.duration is None else now + t.duration,
                 threshold=t.label, figures=figures)
        else:
            move(new, reason, threshold=t.label, figures=figures)
            rec = replace(rec, flagged_until=now + flag_for)
    elif rec.state == "flagged":
        rec = replace(rec, flagged_until=now + flag_for)
    return rec, out


def block_thresholds(cls: VmClass) -> list[Threshold]:
    """The class's thresholds that block on attempts: what a trip wire is for."""
    return [t for t in cls.thresholds if t.metric == "attempts" and t.action == "block"]


def trip_budget(rec: VmRecord, cls: VmClass, mode: str, figure: Figure) -> int | None:
    """Attempts the VM may still make before a block threshold on attempts
    fires (decide()'s own figures): the trip wire's budget (datapath/trip.py),
    so the kernel stops the attempt after the crossing one. None when there
    is nothing to arm: audit, blocked already, an operator's decision in
    force, no block threshold on attempts."""
    if mode != "enforce" or rec.state == "blocked" or rec.manual_until is not None or (
            rec.actor.startswith("operator") and rec.state == "throttled"
            and rec.until is None):
        return None
    left = [t.at_least - figure(t, rec.baseline) for t in block_thresholds(cls)]
    if not left:
        return None
    return max(1, math.ceil(min(left)))


def operator_block(rec: VmRecord, who: str, duration: float | None, reason: str,
                   now: float, state: str = "blocked") -> tuple[VmRecord, Transition]:
    """An operator's block (or, with state="throttled", throttle)."""
    until = None if duration is None else now + duration
    verb = "blocked" if state == "blocked" else "throttled"
    tr = Transition(rec.vm, rec.state, state, now, until, reason or f"{verb} by operator",
                    f"operator:{who}")
    return replace(rec, state=state, since=now, until=until, reason=tr.reason,
                   actor=tr.actor, manual_until=until), tr


def operator_release(rec: VmRecord, who: str, immunity: float, reason: str,
                     now: float) -> tuple[VmRecord, Transition]:
    tr = Transition(rec.vm, rec.state, "ok", now, None, reason or "released by operator",
                    f"operator:{who}")
    return replace(rec, state="ok", since=now, until=None, reason=tr.reason, actor=tr.actor,
                   manual_until=now + immunity, flagged_until=None, baseline=now), tr
