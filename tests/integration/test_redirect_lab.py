"""Port-25 redirect in the lab: a routed VM's connection to an arbitrary
address on port 25 lands on the provider's relay (DNAT), which sees the VM's
own address; the original destination is recorded. Where a redirect cannot
work (the iptables backend, bridged VMs), port 25 fails closed."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import AgentProc, lab_with_agent, require_root, send
from smtpguard.lab import topology
from smtpguard.netns import run_in

RELAY = "198.19.255.25"
ELSEWHERE = "203.0.113.7"  # no route to it in the lab: only a redirect reaches anything
POLICY = f"""
version: 1
relays: [{RELAY}/32]
classes:
  default:
    port25: redirect
    redirect_to: [{RELAY}]
    thresholds: []
"""
Pair = tuple[topology.Lab, AgentProc]


@pytest.fixture(params=["nftables", "iptables"])
def redirecting(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pair]:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with lab_with_agent(tmp_path, 1, policy, routed=1, enforce=True,
                        backend=request.param) as pair:
        yield pair


def test_port25_goes_to_the_relay_which_sees_the_vm(redirecting: Pair) -> None:
    lab, agent = redirecting
    if agent.backend == "iptables":  # no NAT in the iptables backend yet: blocked
        assert send(lab, "rvm1", 2, port=25, timeout=2) == {"refused": 2}
        return

    def session() -> tuple[str, str]:
        with socket.create_connection((ELSEWHERE, 25), timeout=5) as s:
            banner = s.makefile("rb").readline().decode()
            seen = subprocess.run(["ip", "netns", "exec", lab.sink, "ss", "-Htn", "state",
                                   "established", "( sport = :25 )"], capture_output=True,
                                  text=True, check=True).stdout
            return banner, seen

    banner, seen = run_in(lab.vm_ns("rvm1"), session)
    assert banner.startswith("220 sink.lab"), banner  # the relay answered
    seen = seen.replace("[::ffff:", "").replace("]", "")  # the sink listens dual-stack
    assert f"{RELAY}:25 {lab.routed_addr(1)}:" in " ".join(seen.split()), seen  # from the VM
    assert send(lab, "rvm1", 3, port=25, to=ELSEWHERE) == {"completed": 3}
    e: Any = agent.ctl("explain", "rvm1", "--json")
    assert {"address": ELSEWHERE, "attempts": 4} in e["activity"]["top_destinations"]
    assert e["port25"] == "redirect" and e["redirect_to"] == [RELAY]
    # Bridged VMs cannot be redirected by the bridge table: port 25 fails closed.
    assert "completed" not in send(lab, "vm1", 1, port=25, to=ELSEWHERE, timeout=2)
