"""Interfaces come and go, the agent restarts: nothing is lost or duplicated."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import AgentProc, our_filters, send
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology

ATTEMPTS = "smtpguard_smtp_connection_attempts_total"
Pair = tuple[topology.Lab, AgentProc]


def pinned_stats_ifindexes(pin_dir: Path) -> set[int]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin_dir / "smtp_stats")],
                         capture_output=True, text=True, check=True).stdout
    return {e["formatted"]["key"]["ifindex"] for e in json.loads(out)}


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_new_interface_counted_from_first_connection_and_removed_cleanly(own_lab: Pair) -> None:
    """An interface created after the agent started is counted from its first
    connection; once removed it leaves no tc filter, fd or map entry behind."""
    lab, agent = own_lab
    assert agent.proc is not None
    fds_before = fds(agent.proc.pid)
    vm = topology.add_vm(lab, 3)
    ev = agent.wait_event("iface.attached", vm=vm)
    assert send(lab, vm, 7) == {"completed": 7}
    assert agent.counter(ATTEMPTS, vm=vm) == 7
    assert our_filters(lab)[f"veth-{vm}"] == 2  # ingress and egress, once each
    assert ev["ifindex"] in pinned_stats_ifindexes(agent.pin_dir)

    topology.remove_vm(lab, vm)
    agent.wait_event("iface.detached", vm=vm)
    deadline = time.monotonic() + 5
    while ev["ifindex"] in pinned_stats_ifindexes(agent.pin_dir):
        assert time.monotonic() < deadline, "map entries of a removed interface remain"
        time.sleep(0.1)
    assert f"veth-{vm}" not in our_filters(lab)
    assert agent.counter(ATTEMPTS, vm=vm) == 0
    assert agent.metrics()["smtpguard_interfaces_attached"][()] == 2
    assert fds(agent.proc.pid) == fds_before


def test_restart_adopts_filters_and_loses_nothing(own_lab: Pair) -> None:
    """Attempts made while the agent is down are counted (filters and pinned
    maps stay in the kernel); a restart reuses the pinned build, replaces
    filters, never duplicates them."""
    lab, agent = own_lab
    assert send(lab, "vm1", 3) == {"completed": 3}
    agent.stop()
    assert our_filters(lab) == {"veth-vm1": 2, "veth-vm2": 2}  # a plain stop keeps them
    assert send(lab, "vm1", 4) == {"completed": 4}  # nobody watching
    agent.start()
    assert our_filters(lab) == {"veth-vm1": 2, "veth-vm2": 2}
    assert agent.counter(ATTEMPTS, vm="vm1") == 7
    loaded = agent.events("bpf.loaded")
    assert [e["adopted"] for e in loaded] == [False, True]
    assert [e["compiled"] for e in loaded] == [True, False]  # same build: no recompile
    agent.stop(9)  # a crash: same outcome
    assert send(lab, "vm1", 2) == {"completed": 2}
    agent.start()
    assert agent.counter(ATTEMPTS, vm="vm1") == 9
    assert our_filters(lab) == {"veth-vm1": 2, "veth-vm2": 2}


def test_interface_that_vanished_while_down_is_forgotten(own_lab: Pair) -> None:
    """A VM deleted while the agent was down leaves no counters after restart."""
    lab, agent = own_lab
    assert send(lab, "vm2", 2) == {"completed": 2}
    ifindex = agent.wait_event("iface.attached", vm="vm2")["ifindex"]
    agent.stop()
    topology.remove_vm(lab, "vm2")
    agent.start()
    deadline = time.monotonic() + 5
    while ifindex in pinned_stats_ifindexes(agent.pin_dir):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert agent.counter(ATTEMPTS, vm="vm2") == 0


def test_cleanup_removes_everything(own_lab: Pair) -> None:
    """`smtpguard run --cleanup` removes every smtpg_* filter and the pinned maps."""
    lab, agent = own_lab
    agent.stop()
    agent.cleanup()
    assert our_filters(lab) == {}
    assert not agent.pin_dir.exists()


def test_renamed_or_realiased_interface_follows(own_lab: Pair) -> None:
    """Setting an ifalias renames the VM at once; the counters stay with the interface."""
    lab, agent = own_lab
    assert send(lab, "vm1", 2) == {"completed": 2}

    def alias() -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="veth-vm1")[0], ifalias="web1")

    run_in(lab.hv, alias)
    agent.wait_event("iface.attached", vm="web1")
    assert agent.counter(ATTEMPTS, vm="web1") == 2
    assert our_filters(lab)["veth-vm1"] == 2
