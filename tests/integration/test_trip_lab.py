"""The trip wire (datapath/trip.py) with real traffic: a VM opening
connections as fast as it can past a block threshold gets exactly the
threshold's attempts out, the crossing one included, and not one more, in
IPv4 and IPv6; released, it may make that many again once the release's
immunity is over."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import AgentProc, lab_with_agent, require_root, send
from smtpguard.datapath import trip
from smtpguard.datapath.bpfsys import PinnedMap
from smtpguard.datapath.maps import Trip
from smtpguard.lab import topology

AT = 20
POLICY = f"""
version: 1
classes:
  default:
    limit: {{rate: 60000/minute, burst: 5000}}
    thresholds:
      - {{name: burst, metric: attempts, window: 1m, at_least: {AT}, action: block,
         duration: 1h}}
"""
Pair = tuple[topology.Lab, AgentProc]


@pytest.fixture
def armed(tmp_path: Path) -> Iterator[Pair]:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with lab_with_agent(tmp_path, 0, policy, routed=1, enforce=True,
                        backend="nftables") as pair:
        pair[1].wait_event("enforce.applied", backend="nftables")
        yield pair


def left(lab: topology.Lab, agent: AgentProc, vm: str) -> int | None:
    """What the kernel's trip wire lets the VM's interface attempt still."""
    from smtpguard.daemon.netns import run_in

    table = PinnedMap(str(agent.pin_dir / "smtp_trip"), ctypes.c_uint32, Trip)
    try:
        ifindex = run_in(lab.hv, lambda: __import__("socket").if_nametoindex(f"veth-{vm}"))
        return trip.left(table, ifindex)
    finally:
        table.close()


def wait_left(lab: topology.Lab, agent: AgentProc, vm: str, want: int | None,
              timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (have := left(lab, agent, vm)) != want:
        assert time.monotonic() < deadline, f"trip wire of {vm}: {have}, wanted {want}"
        time.sleep(0.05)


def wires(agent: AgentProc) -> dict[str, float]:
    """smtpguard_trip_wires by state, as the agent exports it."""
    fam = agent.metrics()["smtpguard_trip_wires"]
    return {dict(k)["state"]: v for k, v in fam.items()}


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_not_one_attempt_past_the_crossing_one(armed: Pair, ipv6: bool) -> None:
    lab, agent = armed
    # Neighbours resolved (again: the lab did when it made the VM) right
    # before the burst: a burst that meets an unresolved IPv6 neighbour loses
    # SYNs, and their retransmissions a second later meet the block instead.
    topology.warm(lab, "rvm1")
    wait_left(lab, agent, "rvm1", AT)  # armed from the start
    assert wires(agent) == {"armed": 1, "tripped": 0}
    got = send(lab, "rvm1", 300, port=587, ipv6=ipv6, timeout=5)
    assert got.get("completed", 0) == AT, got
    assert got == {"completed": AT, "refused": 300 - AT}, got
    agent.wait_event("vm.blocked", vm="rvm1")
    wait_left(lab, agent, "rvm1", None)  # blocked by its record now: disarmed
    assert wires(agent) == {"armed": 0, "tripped": 0}
    assert agent.counter("smtpguard_smtp_connection_attempts_total", vm="rvm1") == 300
    assert agent.counter("smtpguard_smtp_blocked_attempts_total", vm="rvm1",
                         reason="block") == 300 - AT
    # Released by an operator: not armed while the release's immunity lasts
    # (no automatic decision then either), armed again after it for a fresh
    # threshold's worth (counted from the release).
    agent.ctl("release", "rvm1", "--for", "2s", "--reason", "trip wire test")
    wait_left(lab, agent, "rvm1", None)
    wait_left(lab, agent, "rvm1", AT)
    got = send(lab, "rvm1", 100, port=587, ipv6=ipv6, timeout=5)
    assert got == {"completed": AT, "refused": 100 - AT}, got
