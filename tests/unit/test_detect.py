"""The state machine and the windows: pure logic, fake clock, fake figures."""

from __future__ import annotations

from smtpguard.detect.machine import (
    VmRecord,
    block_duration,
    decide,
    operator_block,
    operator_release,
)
from smtpguard.detect.windows import VmWindows, Windows
from smtpguard.policy import load_text
from smtpguard.policy.model import Threshold, VmClass

CLS = load_text("""version: 1
classes:
  default:
    thresholds:
      - {name: fanout, metric: destinations, window: 1m, at_least: 100, action: block,
         duration: 10s}
      - {name: burst, metric: attempts, window: 1m, at_least: 300, action: throttle,
         duration: 1h}
      - {name: slow, metric: attempts, window: 10m, at_least: 200, action: throttle}
      - {name: volume, metric: attempts, window: 1m, at_least: 60, action: flag}
    escalation: {factor: 3, max: 60s, forget_after: 1h}
""").classes["default"]


def figures(**values: float):  # type: ignore[no-untyped-def]
    """A figure function: threshold label -> value (0 for the others)."""
    return lambda t, since: values.get(t.label, 0)


def step(rec: VmRecord, now: float, blocks: list[float] | None = None, cls: VmClass = CLS,
         **values: float) -> tuple[VmRecord, list[str]]:
    rec, trs = decide(rec, cls, figures(**values), blocks or [], now)
    return rec, [f"{t.event}:{t.reason.split(':')[0]}" for t in trs]


def test_quiet_vm_stays_ok() -> None:
    rec, evs = step(VmRecord("a"), 100, volume=59)
    assert rec.state == "ok" and evs == []


def test_flag_then_block_moves_up_and_strongest_wins() -> None:
    """A VM moves up only; when several thresholds fire, the strongest acts."""
    rec, evs = step(VmRecord("a"), 100, volume=60)
    assert (rec.state, evs) == ("flagged", ["vm.flagged:volume"])
    rec, evs = step(rec, 101, volume=400, burst=400, fanout=150)
    assert (rec.state, rec.until, evs) == ("blocked", 111, ["vm.blocked:fanout"])
    rec, evs = step(rec, 102, volume=70)  # less than the block: nothing changes
    assert (rec.state, evs) == ("blocked", [])


def test_block_expires_on_time_and_starts_afresh() -> None:
    """At expiry the VM is ok and its windows restart (the cooling-off), so
    the figures that caused the block do not re-trigger it."""
    rec, _ = step(VmRecord("a"), 100, fanout=100)
    rec, evs = step(rec, 109.9, fanout=100)
    assert rec.state == "blocked" and evs == []
    seen_since = []
    rec, trs = decide(rec, CLS, lambda t, since: seen_since.append(since) or 0, [], 110)
    assert rec.state == "ok" and [t.event for t in trs] == ["vm.released"]
    assert rec.baseline == 110 and set(seen_since) == {110}


def test_repeat_offenders_escalate_up_to_the_cap() -> None:
    """10 s, then x3 per earlier block within forget_after, capped at 60 s."""
    t = next(t for t in CLS.thresholds if t.label == "fanout")
    assert [block_duration(t, CLS, k) for k in range(4)] == [10, 30, 60, 60]
    rec, _ = step(VmRecord("a"), 1000, blocks=[990, 500], fanout=120)
    assert rec.until == 1000 + 60  # two earlier blocks within the hour: 10 x 9 -> cap 60
    rec, _ = step(VmRecord("b"), 10000, blocks=[990], fanout=120)
    assert rec.until == 10010  # the earlier block is forgotten after an hour


def test_throttle_with_and_without_duration() -> None:
    rec, evs = step(VmRecord("a"), 100, burst=300)
    assert (rec.state, rec.until, evs) == ("throttled", 3700, ["vm.throttled:burst"])
    rec, evs = step(VmRecord("b"), 100, slow=250)
    assert (rec.state, rec.until) == ("throttled", None)
    rec, evs = step(rec, 200, slow=250)
    assert rec.state == "throttled"
    rec, evs = step(rec, 300, slow=10)  # quiet again: lifted, windows restart
    assert (rec.state, rec.baseline, evs) == ("ok", 300, ["vm.released:throttle lifted"])


def test_flag_clears_after_its_window_of_quiet() -> None:
    rec, _ = step(VmRecord("a"), 100, volume=61)
    rec, evs = step(rec, 130, volume=61)  # still firing: extended
    assert rec.flagged_until == 190
    rec, evs = step(rec, 189, volume=0)
    assert rec.state == "flagged"
    rec, evs = step(rec, 190, volume=0)
    assert (rec.state, evs) == ("ok", ["vm.released:flag cleared"])


def test_operator_block_and_release_win_until_they_expire() -> None:
    rec, tr = operator_block(VmRecord("a"), "alice", 3600, "ticket 42", now=100)
    assert (rec.state, rec.until, tr.actor) == ("blocked", 3700, "operator:alice")
    rec, evs = step(rec, 200, volume=1000, fanout=1000)
    assert (rec.state, rec.until, evs) == ("blocked", 3700, [])
    rec, tr = operator_release(rec, "bob", 600, "false positive", now=300)
    assert rec.state == "ok"
    rec, evs = step(rec, 400, fanout=1000)  # immune for 10 minutes
    assert (rec.state, evs) == ("ok", [])
    rec, evs = step(rec, 901, fanout=1000)
    assert (rec.state, evs) == ("blocked", ["vm.blocked:fanout"])


def test_open_ended_operator_block_holds() -> None:
    rec, _ = operator_block(VmRecord("a"), "alice", None, "", now=100)
    rec, evs = step(rec, 10**9)
    assert (rec.state, evs) == ("blocked", [])


def test_operator_throttle_holds_until_it_expires() -> None:
    """An operator's throttle is not lifted by quiet (as an automatic
    open-ended one is) nor raised to a block by detection; it ends on time."""
    rec, tr = operator_block(VmRecord("a"), "alice", 600, "", now=100, state="throttled")
    assert (rec.state, rec.until, tr.reason) == ("throttled", 700, "throttled by operator")
    rec, evs = step(rec, 200, fanout=1000)
    assert (rec.state, evs) == ("throttled", [])
    rec, evs = step(rec, 701)
    assert (rec.state, evs) == ("ok", ["vm.released:throttle expired"])
    rec, _ = operator_block(VmRecord("b"), "alice", None, "", now=100, state="throttled")
    rec, evs = step(rec, 10**6)
    assert (rec.state, evs) == ("throttled", [])


def test_threshold_label_defaults() -> None:
    t = Threshold(metric="attempts", window=600, at_least=5, action="flag")
    assert t.label == "attempts_10m"


def test_windows_values_and_memory_bound() -> None:
    """Growth over a window from cumulative samples; samples kept are bounded
    (tiers) however long the VM lives; a counter going down restarts."""
    w = VmWindows()
    for t in range(0, 2 * 86400, 1):
        w.add(float(t), (t, 0, t // 10))
    now = 2 * 86400 - 1.0
    assert w.value("attempts", 60, now) == 60
    assert abs(w.value("attempts", 3600, now) - 3600) <= 10
    assert abs(w.value("failed_handshakes", 86400, now) - 8640) <= 30
    assert w.value("attempts", 60, now, since=now - 5) == 5
    assert len(w) < 900
    w.add(now + 1, (5, 0, 0))
    assert w.value("attempts", 60, now + 1) == 0


def test_windows_drop_vanished_vms() -> None:
    ws = Windows()
    ws.update(0, {"a": (1, 0, 0), "b": (1, 0, 0)})
    ws.update(1, {"a": (3, 0, 0)})
    assert set(ws.vms) == {"a"} and ws.value("a", "attempts", 60, 1) == 2
    assert ws.value("b", "attempts", 60, 1) == 0


def test_windows_skip_unchanged_samples_yet_count_growth_after_a_long_idle() -> None:
    """Idle VMs get no samples; growth after a day of idling is still counted
    from the value it had just before (as if sampled every step)."""
    from smtpguard.detect.windows import Windows

    w = Windows()
    for t in range(0, 100_000, 1):
        if t % 1000 == 0 or t < 5:
            w.update(float(t), {"vm": (7, 0, 0)})
    assert len(w.vms["vm"]) == 3  # the first sample only, one per tier
    w.update(100_000.0, {"vm": (10, 0, 0)})
    assert w.value("vm", "attempts", 60, 100_000.0) == 3
    assert w.value("vm", "attempts", 3600, 100_000.0) == 3
