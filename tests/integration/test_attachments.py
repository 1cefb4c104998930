"""VMs plugged in where neither the bridge nor the inet hook sees them: an
Open vSwitch port, whose frames OVS's rx_handler takes after the device's own
ingress hooks. These machines' kernel has no openvswitch module, so the lab
stands one in with the same shape (lab/topology.py, add_switched_vm): the
VM's host device is the lower of a macvlan in the sink, whose rx_handler
takes the frames straight to the sink. The real OVS runs in the system tier
(tests/system/test_ovs.py); the real macvtap in the hypervisor tier.

The policy says `attachment: ovs` for those devices (the agent's own
detection reads a port's master, ovs-system, which the stand-in lacks)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import AgentProc, lab_with_agent, require_root, send
from smtpguard.lab import topology

BLOCKED = "smtpguard_smtp_blocked_attempts_total"
ATTEMPTS = "smtpguard_smtp_connection_attempts_total"
RELAY4 = "198.19.255.25"


def policy(attachment: str) -> str:
    return f"""
version: 1
relays: [{RELAY4}/32]
interfaces:
  patterns:
    - {{pattern: "veth-svm*", attachment: {attachment}}}
    - {{pattern: "veth*"}}
classes:
  default:
    port25: block
    limit: {{rate: 60/minute, burst: 10}}
    limited_ports: [465, 587, 2525]
    throttle: {{rate: 6/minute, burst: 2}}
    thresholds: []
"""


Pair = tuple[topology.Lab, AgentProc]


def _lab(tmp_path: Path, attachment: str, backend: str) -> Iterator[Pair]:
    require_root()
    path = tmp_path / "policy.yaml"
    path.write_text(policy(attachment))
    with lab_with_agent(tmp_path, 1, path, switched=1, enforce=True, backend=backend) as pair:
        pair[1].wait_event("enforce.applied", backend=backend)
        yield pair


@pytest.fixture
def switched(tmp_path: Path) -> Iterator[Pair]:
    yield from _lab(tmp_path, "ovs", "nftables")


def hv(lab: topology.Lab, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", lab.hv, *cmd], capture_output=True,
                          text=True, check=False)


def row(agent: AgentProc, vm: str) -> dict[str, object]:
    rows = agent.ctl("status", "--json")
    assert isinstance(rows, list)
    return next(r for r in rows if r["vm"] == vm)


def test_the_stand_in_bypasses_the_bridge_and_inet_tables(tmp_path: Path) -> None:
    """Without a hook on the device itself, a switched VM's port 25 goes
    through although its attempts are counted: the gap the netdev table
    closes (and proof that the stand-in has OVS's shape)."""
    for pair in _lab(tmp_path, "routed", "nftables"):
        lab, agent = pair
        assert send(lab, "svm1", 3, port=25, timeout=2) == {"completed": 3}
        assert agent.counter(ATTEMPTS, vm="svm1", port="25") == 3
        assert row(agent, "svm1")["attachment"] == "routed"


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_switched_vm_port25_refused_counted_once_submission_and_relay_open(
        switched: Pair, ipv6: bool) -> None:
    """On a switched device the netdev table refuses port 25 (a reset: this
    kernel has nft_reject_netdev), counts each distinct attempt once, lets
    submission within the ceiling and the relay through; status says how the
    VM is plugged in and that it is fully covered."""
    lab, agent = switched
    assert send(lab, "svm1", 4, port=25, ipv6=ipv6, timeout=2) == {"refused": 4}
    assert send(lab, "svm1", 3, port=587, ipv6=ipv6) == {"completed": 3}
    if not ipv6:
        assert send(lab, "svm1", 2, port=25, to=RELAY4) == {"completed": 2}
    assert agent.counter(BLOCKED, vm="svm1", port="25", reason="port25") == 4
    assert agent.counter(ATTEMPTS, vm="svm1", port="587") == 3
    r = row(agent, "svm1")
    assert (r["attachment"], r["coverage"]) == ("ovs", "full")
    assert row(agent, "vm1")["attachment"] == "bridge"
    chain = hv(lab, "nft", "list", "chain", "netdev", "smtpguard", "in_veth-svm1")
    assert chain.returncode == 0 and 'hook ingress device "veth-svm1"' in chain.stdout


def test_switched_vm_block_and_release_by_the_operator(switched: Pair) -> None:
    """A block stops a switched VM's next SYN on every port; a release lets
    it through again."""
    lab, agent = switched
    assert send(lab, "svm1", 2, port=587) == {"completed": 2}
    agent.ctl("block", "svm1", "--for", "1h", "--reason", "attachment test")
    assert send(lab, "svm1", 3, port=587, timeout=2) == {"refused": 3}
    assert agent.counter(BLOCKED, vm="svm1", port="587", reason="block") == 3
    agent.ctl("release", "svm1")
    assert send(lab, "svm1", 2, port=587) == {"completed": 2}


def test_switched_vm_ceiling_holds(switched: Pair) -> None:
    """60/minute, burst 10: of 40 attempts in about 2 s, the burst and what
    accrues meanwhile are accepted, never more; the rest are refused and
    counted as the limit's."""
    lab, agent = switched
    start = time.monotonic()
    got = send(lab, "svm1", 40, port=587, rate=20, dialog="connect", timeout=2)
    elapsed = time.monotonic() - start
    accepted = got.get("completed", 0)
    assert 10 <= accepted <= 10 + elapsed + 1, (got, elapsed)
    assert got.get("refused", 0) == 40 - accepted
    assert agent.counter(BLOCKED, vm="svm1", port="587", reason="limit") == 40 - accepted


def test_a_device_that_goes_takes_its_chain_with_it(switched: Pair) -> None:
    """The netdev table hooks exactly the switched devices present: one that
    goes loses its base chain, and the repair pass finds nothing to add."""
    lab, agent = switched
    assert hv(lab, "nft", "list", "chain", "netdev", "smtpguard", "in_veth-svm1").returncode == 0
    topology.remove_vm(lab, "svm1")
    agent.wait_event("iface.detached", interface="veth-svm1")
    deadline = time.monotonic() + 10
    while hv(lab, "nft", "list", "chain", "netdev", "smtpguard",
             "in_veth-svm1").returncode == 0:
        assert time.monotonic() < deadline, "in_veth-svm1 still there"
        time.sleep(0.1)
    time.sleep(11)  # one repair pass (every 10 s)
    assert not agent.events("enforce.repaired")


def test_iptables_counts_a_switched_vm_and_says_it_cannot_stop_it(tmp_path: Path) -> None:
    """The iptables backend has no hook where a switched VM's packets pass:
    they are counted, status and the metrics say the VM is out of reach, and
    the log names it once."""
    for lab, agent in _lab(tmp_path, "ovs", "iptables"):
        ev = agent.wait_event("vm.unenforced", interface="veth-svm1")
        assert ev["attachment"] == "ovs"
        assert send(lab, "svm1", 2, port=25, timeout=2) == {"completed": 2}
        assert agent.counter(ATTEMPTS, vm="svm1", port="25") == 2
        assert row(agent, "svm1")["coverage"] == "counted only (iptables cannot reach ovs)"
        assert agent.counter("smtpguard_interfaces_unenforced", attachment="ovs") == 1
        assert send(lab, "vm1", 2, port=25, timeout=2) != {"completed": 2}
        assert len(agent.events("vm.unenforced")) == 1
