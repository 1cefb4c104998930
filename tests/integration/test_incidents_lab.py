"""Incidents, explain and audit mode in the lab, end to end through the CLI:
a VM that knocks on port 25 is caught, and its incident holds exactly what the
lab sent; in audit mode the same traffic gets the same incident while every
connection completes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import AgentProc, lab_with_agent, require_root, send
from smtpguard.lab import topology

CONNECTIONS, DESTINATIONS = 40, 20
POLICY = """
version: 1
mode: {mode}
classes:
  default:
    port25: block
    thresholds:
      - {{name: knocking, metric: attempts, window: 1m, at_least: 30, action: block,
         duration: 1h}}
incidents: {{top_destinations: 50}}
"""
Pair = tuple[topology.Lab, AgentProc]


@pytest.fixture(params=["enforce", "audit"])
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pair]:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(mode=request.param))
    with lab_with_agent(tmp_path, 1, policy, routed=1, enforce=True) as pair:
        yield pair


def test_incident_holds_what_the_vm_did_and_explain_names_the_rule(lab: Pair) -> None:
    """40 port-25 connections to 20 destinations: one incident whose activity
    counts exactly 40 attempts, 2 per destination, over exactly the 20
    addresses the lab used; `explain` names the rule and where it is written.
    In audit mode: the same incident, `would_block`, and every connection
    completes."""
    lab_, agent = lab
    audit = "mode: audit" in (agent.policy.read_text() if agent.policy else "")
    out = send(lab_, "rvm1", CONNECTIONS, port=25, destinations=DESTINATIONS, timeout=2)
    assert out == ({"completed": CONNECTIONS} if audit else {"refused": CONNECTIONS})
    ev = agent.wait_event("vm.blocked", vm="rvm1")
    assert ev["enforced"] is (not audit)

    rows: Any = agent.ctl("incidents", "--vm", "rvm1", "--json")
    assert [r["state"] for r in rows] == ["blocked"] and rows[0]["mode"] == (
        "audit" if audit else "enforce")
    inc: Any = agent.ctl("incidents", "show", str(rows[0]["id"]), "--json")
    act = inc["activity"]
    assert act["attempts"] == CONNECTIONS and act["destinations"] == DESTINATIONS
    want = {topology.dest_addr(i) for i in range(DESTINATIONS)}
    assert {d["address"] for d in act["top_destinations"]} == want
    assert {d["attempts"] for d in act["top_destinations"]} == {CONNECTIONS // DESTINATIONS}
    assert act["ports"]["25"]["attempts"] == CONNECTIONS
    (action,) = inc["actions"]
    assert action["action"] == ("would_block" if audit else "block")
    assert action["rule"]["threshold"] == "knocking"
    assert inc["trigger"]["figures"]["knocking"] >= 30
    assert inc["policy"]["generation"] == 1

    text = agent.ctl("incidents", "show", str(rows[0]["id"]))["text"]  # type: ignore[call-overload]
    assert f"Incident {rows[0]['id']}: VM rvm1" in text and topology.dest_addr(0) in text

    e: Any = agent.ctl("explain", "rvm1", "--json")
    assert e["state"] == "blocked" and e["rule"]["threshold"] == "knocking"
    assert e["rule"]["where"].startswith(str(agent.policy)) and e["incident"]["id"] == rows[0]["id"]
    words = agent.ctl("explain", "rvm1")["text"]  # type: ignore[call-overload]
    assert "knocking: attempts >= 30 in 1m -> block for 1h" in words

    would = agent.counter("smtpguard_enforcement_actions_total", action="would_block")
    done = agent.counter("smtpguard_enforcement_actions_total", action="block")
    assert (would, done) == ((1, 0) if audit else (0, 1))
