"""What the abuse desk reads: figures as people read them, and outcomes that
add up to the attempts."""

from __future__ import annotations

from smtpguard.datapath.snapshot import PortCounts
from smtpguard.detect.machine import figure_text, reason_text
from smtpguard.policy.load import load_text
from smtpguard.respond.evidence import outcomes
from smtpguard.respond.incidents import render

POLICY = load_text("""version: 1
classes:
  default:
    thresholds:
      - {name: fanout, metric: destinations, window: 1m, at_least: 100, action: block,
         duration: 1h}
      - {name: volume, metric: attempts, window: 10m, at_least: 60, action: flag}
""")


def test_estimates_read_as_estimates_and_counts_as_counts() -> None:
    """Distinct destinations come from a sketch: `~112`, never `112.008`;
    attempts are exact integers; windows read as durations."""
    fanout, volume = POLICY.classes["default"].thresholds
    assert reason_text(fanout, 112.008) == "fanout: destinations ~112 >= 100 in 1m"
    assert reason_text(volume, 61.0) == "volume: attempts 61 >= 60 in 10m"
    assert figure_text("destinations", 99.6) == "~100"


def test_outcomes_add_up_with_smtpguards_own_rejections_apart() -> None:
    """A VM over its ceiling: 122 attempts, 10 completed. Where the path
    rejects with a reset, smtpguard's 110 resets are its rejections, not the
    receiver's; where it drops, the retried SYNs it dropped are not the
    receiver's silence. Either way the columns add up to the attempts."""
    stats = {7: {587: PortCounts(attempts=122, completed=10, reset=112)},
             8: {587: PortCounts(attempts=50, completed=5, no_answer=40)},
             9: {587: PortCounts(attempts=999)}}  # another VM's interface
    by_reset = outcomes(stats, [7], {587: (110, 0)})["587"]
    assert {k: by_reset[k] for k in ("attempts", "completed", "rejected", "reset",
                                     "no_answer", "pending")} == {
        "attempts": 122, "completed": 10, "rejected": 110, "reset": 2, "no_answer": 0,
        "pending": 0}
    skewed = outcomes({7: {587: PortCounts(attempts=100, completed=10, reset=50)}}, [7],
                      {587: (95, 0)})["587"]  # rejections read after more attempts came
    assert (skewed["rejected"], skewed["reset"], skewed["pending"]) == (90, 0, 0)
    by_drop = outcomes(stats, [8], {587: (0, 45)})["587"]
    assert (by_drop["rejected"], by_drop["no_answer"], by_drop["pending"]) == (45, 0, 0)
    for p in (by_reset, by_drop):
        assert p["completed"] + p["rejected"] + p["reset"] + p["no_answer"] + p["pending"] \
            == p["attempts"]


def test_the_incident_text_names_the_rejected_outcome() -> None:
    inc = {"id": 3, "vm": "web", "opened": 0.0, "closed": None, "state": "throttled",
           "trigger": {"reason": "burst: attempts 120 >= 100 in 1m"}, "actions": [],
           "activity": {"at": 0.0, "attempts": 120, "destinations": 1, "ports": {
               "587": {"attempts": 120, "completed": 10, "rejected": 110, "reset": 0,
                       "no_answer": 0, "pending": 0}}}}
    assert "    port 587: 120 attempts: 10 completed, 110 rejected by smtpguard, 0 reset, " \
        "0 unanswered, 0 pending" in render(inc).splitlines()
