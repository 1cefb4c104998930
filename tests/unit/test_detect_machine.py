"""The trip wire's budget (detect.machine.trip_budget): pure logic, fake figures."""

from __future__ import annotations

from dataclasses import replace

from smtpguard.detect.machine import VmRecord, operator_release, trip_budget
from smtpguard.policy import load_text

CLS = load_text("""version: 1
classes:
  default:
    thresholds:
      - {name: fanout, metric: destinations, window: 1m, at_least: 100, action: block,
         duration: 10s}
      - {name: burst, metric: attempts, window: 1m, at_least: 300, action: block,
         duration: 1h}
      - {name: slow, metric: attempts, window: 10m, at_least: 500, action: block,
         duration: 1h}
      - {name: volume, metric: attempts, window: 1m, at_least: 60, action: flag}
""").classes["default"]


def figures(**values: float):  # type: ignore[no-untyped-def]
    return lambda t, since: values.get(t.label, 0)


def test_the_nearest_block_threshold_on_attempts_sets_the_budget() -> None:
    rec = VmRecord("vm1")
    assert trip_budget(rec, CLS, "enforce", figures()) == 300
    assert trip_budget(rec, CLS, "enforce", figures(burst=120, slow=450)) == 50
    # Flags and destination thresholds are not the wire's: the agent acts on them.
    assert trip_budget(rec, CLS, "enforce", figures(volume=59, fanout=99)) == 300
    # At or past a threshold (the agent blocks it this step): the next attempt
    # may still be the crossing one.
    assert trip_budget(rec, CLS, "enforce", figures(burst=300)) == 1


def test_nothing_to_arm_in_audit_when_blocked_or_while_an_operator_decides() -> None:
    rec = VmRecord("vm1")
    assert trip_budget(rec, CLS, "audit", figures()) is None
    assert trip_budget(replace(rec, state="blocked"), CLS, "enforce", figures()) is None
    released, _ = operator_release(replace(rec, state="blocked"), "root", 3600, "", 100.0)
    assert trip_budget(released, CLS, "enforce", figures()) is None  # its immunity
    assert trip_budget(replace(released, manual_until=None), CLS, "enforce",
                       figures()) == 300
    flag_only = load_text("version: 1\nclasses: {default: {thresholds: "
                          "[{metric: attempts, window: 1m, at_least: 5, action: flag}]}}"
                          ).classes["default"]
    assert trip_budget(rec, flag_only, "enforce", figures()) is None


def test_the_budget_counts_from_the_baseline_decide_uses() -> None:
    seen = []
    rec = replace(VmRecord("vm1"), baseline=1234.0)
    trip_budget(rec, CLS, "enforce", lambda t, since: seen.append(since) or 0)
    assert set(seen) == {1234.0}
