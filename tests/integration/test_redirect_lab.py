"""Port-25 redirect in the lab: a VM's connection to an arbitrary address on
port 25 lands on the provider's relay (DNAT), which sees the VM's own
address; the original destination is recorded. Routed taps are redirected
by both backends; bridged VMs by iptables (br_netfilter shows their port to
the nat table), while nftables' bridge table cannot and fails closed."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import AgentProc, lab_with_agent, require_root, send
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology

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


def relayed(lab: topology.Lab, vm: str, addr: str, dest: str = ELSEWHERE) -> None:
    """One session from the VM to dest: the relay answers it on its own
    address (not dest's), and sees the VM's address."""
    def session() -> tuple[str, str]:
        with socket.create_connection((dest, 25), timeout=5) as s:
            banner = s.makefile("rb").readline().decode()
            seen = subprocess.run(["ip", "netns", "exec", lab.sink, "ss", "-Htn", "state",
                                   "established", "( sport = :25 )"], capture_output=True,
                                  text=True, check=True).stdout
            return banner, seen

    banner, seen = run_in(lab.vm_ns(vm), session)
    assert banner.startswith("220 sink.lab"), banner  # the relay answered
    seen = " ".join(seen.replace("[::ffff:", "").replace("]", "").split())  # dual-stack sink
    assert f"{RELAY}:25 {addr}:" in seen, seen  # from the VM's own address


def test_port25_goes_to_the_relay_which_sees_the_vm(redirecting: Pair) -> None:
    lab, agent = redirecting
    relayed(lab, "rvm1", lab.routed_addr(1))
    assert send(lab, "rvm1", 3, port=25, to=ELSEWHERE) == {"completed": 3}
    e: Any = agent.ctl("explain", "rvm1", "--json")
    assert {"address": ELSEWHERE, "attempts": 4} in e["activity"]["top_destinations"]
    assert e["port25"] == "redirect" and e["redirect_to"] == [RELAY]
    if agent.backend == "iptables":
        # Bridged, through br_netfilter. The lab routes bridged VMs only to the
        # sink's range, so the destination is one of its addresses: the
        # session must still end on the relay's.
        relayed(lab, "vm1", lab.vm_addr(1), dest=topology.dest_addr(5))
    else:  # the bridge table cannot redirect: port 25 fails closed
        assert "completed" not in send(lab, "vm1", 1, port=25, to=ELSEWHERE, timeout=2)


def test_redirected_connections_still_meet_the_ceiling(redirecting: Pair) -> None:
    """Redirected port-25 connections count against the VM's ceiling (20/minute,
    burst 10), in both backends (iptables sees them after the DNAT)."""
    lab, agent = redirecting
    out = send(lab, "rvm1", 14, port=25, to=ELSEWHERE, timeout=2)
    assert out.get("completed", 0) in (10, 11) and sum(out.values()) == 14, out
