"""Incidents: opening, gathering an episode's actions, closing with frozen
evidence, persistence, retention. Pure logic over a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smtpguard.detect.machine import Transition
from smtpguard.respond.incidents import IncidentBook, render
from smtpguard.respond.store import Store


class Activity:
    def __init__(self) -> None:
        self.attempts = 0

    def __call__(self, vm: str) -> dict[str, Any]:
        return {"at": 1000.0, "attempts": self.attempts, "destinations": 2,
                "top_destinations": [{"address": "198.19.0.1", "attempts": self.attempts - 1},
                                     {"address": "198.19.0.2", "attempts": 1}],
                "ports": {"25": {"attempts": self.attempts, "completed": 0, "reset": 0,
                                 "no_answer": self.attempts, "retransmits": 0}}}


def context(vm: str, threshold: str | None) -> dict[str, Any]:
    rule = None if threshold is None else {"threshold": threshold, "text": f"{threshold}: ...",
                                           "where": "p.yaml:9:9"}
    return {"class": "default", "mode": "enforce", "interfaces": ["vnet1"], "rule": rule,
            "windows": {"attempts_1m": 40.0}, "policy": {"generation": 3, "digest": "abc"}}


def tr(new: str, old: str, at: float, actor: str = "auto", threshold: str | None = "fanout",
       ) -> Transition:
    return Transition("vm1", old, new, at, None if new != "blocked" else at + 3600,
                      f"{threshold}: went {new}", actor, threshold, {"fanout": 104.0})


def book(tmp_path: Path, activity: Activity) -> IncidentBook:
    return IncidentBook(Store(tmp_path / "state.db"), activity, context, wall=lambda: 5000.0)


def test_an_episode_is_one_incident_with_every_action(tmp_path: Path) -> None:
    """A flag opens the incident, the block that follows joins it, the release
    closes it with the activity frozen as it was then; the next flag opens a
    new one."""
    act = Activity()
    b = book(tmp_path, act)
    first = b.record(tr("flagged", "ok", 100), enforced=True)
    assert first is not None and first["trigger"]["threshold"] == "fanout"
    b.record(tr("blocked", "flagged", 110), enforced=True)
    act.attempts = 120
    live = b.show(first["id"])
    assert live is not None and live["activity"]["attempts"] == 120  # live while open
    b.record(tr("ok", "blocked", 200, actor="operator:bob", threshold=None), enforced=True)
    act.attempts = 999
    done = b.show(first["id"])
    assert done is not None
    assert [a["action"] for a in done["actions"]] == ["flag", "block", "release"]
    assert done["closed"] == 200 and done["activity"]["attempts"] == 120  # frozen
    again = b.record(tr("flagged", "ok", 300), enforced=True)
    assert again is not None and again["id"] != first["id"]
    assert [i["id"] for i in b.list("vm1")] == [first["id"], again["id"]]


def test_open_incidents_survive_a_restart(tmp_path: Path) -> None:
    act = Activity()
    inc = book(tmp_path, act).record(tr("blocked", "ok", 100), enforced=True)
    assert inc is not None
    b2 = book(tmp_path, act)
    b2.start()
    b2.record(tr("ok", "blocked", 200, threshold=None), enforced=True)
    got = b2.show(inc["id"])
    assert got is not None and got["closed"] == 200 and len(got["actions"]) == 2


def test_audit_actions_say_what_would_have_been_done(tmp_path: Path) -> None:
    inc = book(tmp_path, Activity()).record(tr("blocked", "ok", 100), enforced=False)
    assert inc is not None
    assert inc["actions"][0]["action"] == "would_block"
    assert not inc["actions"][0]["enforced"]


def test_retention_forgets_only_old_closed_incidents(tmp_path: Path) -> None:
    b = book(tmp_path, Activity())
    b.record(tr("flagged", "ok", 100), enforced=True)
    b.record(tr("ok", "flagged", 200, threshold=None), enforced=True)
    b.record(tr("blocked", "ok", 300), enforced=True)  # still open: kept whatever its age
    assert b.prune(retention=4000) == 1  # closed at 200 < 5000 - 4000
    assert [i["state"] for i in b.list()] == ["blocked"]


def test_without_a_store_incidents_live_in_memory() -> None:
    b = IncidentBook(None, Activity(), context)
    inc = b.record(tr("blocked", "ok", 100), enforced=True)
    assert inc is not None and b.show(inc["id"]) is not None and len(b.list()) == 1


def test_rendered_for_a_ticket(tmp_path: Path) -> None:
    act = Activity()
    act.attempts = 7
    b = book(tmp_path, act)
    inc = b.record(tr("blocked", "ok", 100), enforced=True)
    assert inc is not None
    text = render(b.show(inc["id"]) or {})
    assert f"Incident {inc['id']}: VM vm1" in text
    assert "fanout: ... (p.yaml:9:9)" in text
    assert "198.19.0.1" in text and "port 25: 7 attempts" in text
