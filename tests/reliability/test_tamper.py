"""Someone flushes the whole ruleset behind the agent's back (another
firewall manager, an operator's `nft flush ruleset` or `iptables -F; -X`),
again and again: the agent notices within its repair interval, logs it, and
puts back every block it holds."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from kit import lab_with_agent, require_root, scale, send

ROUNDS = scale(10, 2)
POLICY = """
version: 1
classes:
  default: {port25: block, limit: {rate: 600/minute, burst: 50}, thresholds: []}
"""
FLUSH = {
    "nftables": [["nft", "flush", "ruleset"]],
    "iptables": [[tool, "-F"] for tool in ("iptables-legacy", "ip6tables-legacy")]
    + [[tool, "-X"] for tool in ("iptables-legacy", "ip6tables-legacy")],
}


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_flushed_ruleset_is_repaired_with_its_blocks(tmp_path: Path, backend: str) -> None:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with lab_with_agent(tmp_path, 1, policy, routed=1, enforce=True,
                        backend=backend) as (lab, agent):
        agent.ctl("block", "rvm1", "--for", "1h", "--reason", "tamper test")
        repairs = 0
        for _ in range(ROUNDS):
            for cmd in FLUSH[backend]:
                subprocess.run(["ip", "netns", "exec", lab.hv, *cmd], check=True)
            assert send(lab, "vm1", 1, port=25) == {"completed": 1}  # really gone
            deadline = time.monotonic() + 25
            while len(agent.events("enforce.repaired")) <= repairs:
                assert time.monotonic() < deadline, "not repaired"
                time.sleep(0.2)
            repairs += 1
            assert send(lab, "vm1", 1, port=25, timeout=2) != {"completed": 1}
            assert send(lab, "rvm1", 1, port=587, timeout=2) == {"refused": 1}  # still blocked
        print(f"\ntamper ({backend}): {repairs} flushes, {repairs} repairs")
