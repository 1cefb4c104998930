"""VM interfaces created and destroyed in bursts while the agent runs: each
new one is counted from its first SYN, and once they are gone nothing is left
behind: no tc filter, map entry, firewall object or file descriptor, and the
agent's memory stays flat."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

import frames as f
from kit import AgentProc, lab_with_agent, our_filters, require_root, scale
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology

TOTAL = scale(500, 40)
BURST = scale(50, 20)
ATTEMPTS = "smtpguard_smtp_connection_attempts_total"
POLICY = """
version: 1
classes:
  default: {port25: block, thresholds: []}
"""


def links(lab: topology.Lab, names: list[int], add: bool) -> None:
    """veth pairs in the hypervisor: vethcN faces the "VM", pcN is its far end."""
    def run() -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for i in names:
                if add:
                    ipr.link("add", ifname=f"vethc{i}", kind="veth", peer=f"pc{i}")
                    for n in (f"vethc{i}", f"pc{i}"):
                        ipr.link("set", index=ipr.link_lookup(ifname=n)[0], state="up")
                else:
                    ipr.link("del", index=ipr.link_lookup(ifname=f"vethc{i}")[0])

    run_in(lab.hv, run)


def inject(lab: topology.Lab, names: list[int]) -> None:
    """One SYN into each new interface, as its VM's first packet."""
    def run() -> None:
        for i in names:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
                s.bind((f"pc{i}", 0))
                s.send(f.syn4(src="198.18.9.9", dst=topology.dest_addr(i), sport=20000 + i,
                              seq=i))

    run_in(lab.hv, run)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def leftovers(lab: topology.Lab, agent: AgentProc, backend: str) -> list[str]:
    """Anything of ours that still names a churned interface."""
    found = [n for n in our_filters(lab) if n.startswith("vethc")]
    dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned",
                           str(agent.pin_dir / "smtp_stats")], capture_output=True, text=True,
                          check=True).stdout
    keys = {e["formatted"]["key"]["ifindex"] for e in json.loads(dump)}
    ifindexes = set(run_in(lab.hv, _ifindexes))
    found += [f"stats entry of ifindex {k}" for k in keys - ifindexes]
    hv = ["ip", "netns", "exec", lab.hv]
    if backend == "iptables":
        text = subprocess.run([*hv, "iptables-legacy-save", "-t", "filter"],
                              capture_output=True, text=True, check=True).stdout
    else:
        text = subprocess.run([*hv, "nft", "list", "table", "inet", "smtpguard"],
                              capture_output=True, text=True, check=True).stdout
    found += [ln.strip() for ln in text.splitlines() if "vethc" in ln]
    return found


def _ifindexes() -> list[int]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [m["index"] for m in ipr.get_links()]


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_interface_churn_counts_every_newcomer_and_leaks_nothing(tmp_path: Path,
                                                                 backend: str) -> None:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with lab_with_agent(tmp_path, 1, policy, enforce=True, backend=backend) as (lab, agent):
        assert agent.proc is not None
        pid = agent.proc.pid
        fds_before = len(os.listdir(f"/proc/{pid}/fd"))
        rss: list[float] = []
        counted = 0
        for start in range(0, TOTAL, BURST):
            names = list(range(start, min(TOTAL, start + BURST)))
            links(lab, names, add=True)
            deadline = time.monotonic() + 30
            while agent.metrics()["smtpguard_interfaces_attached"][()] < 1 + len(names):
                assert time.monotonic() < deadline, "new interfaces were not attached"
                time.sleep(0.1)
            inject(lab, names)
            time.sleep(0.3)
            series = agent.metrics().get(ATTEMPTS, {})
            got = {dict(k)["interface"]: v for k, v in series.items()}
            counted += sum(1 for i in names if got.get(f"vethc{i}") == 1)
            links(lab, names, add=False)
            rss.append(rss_mb(pid))
        deadline = time.monotonic() + 30
        while (left := leftovers(lab, agent, backend)):
            assert time.monotonic() < deadline, left[:10]
            time.sleep(0.5)
        fds_after = len(os.listdir(f"/proc/{pid}/fd"))
        print(f"\nchurn ({backend}): {TOTAL} interfaces in bursts of {BURST}, {counted} "
              f"counted from their first SYN; fds {fds_before} -> {fds_after}; RSS MB "
              f"{' '.join(f'{r:.1f}' for r in rss)}")
        assert counted == TOTAL
        assert fds_after == fds_before
        assert rss[-1] - rss[0] < 10, rss  # flat: no per-interface growth that stays
