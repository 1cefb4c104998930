"""One scrape never shows more rejections than attempts: a SYN is counted
(tc ingress) before nftables or iptables can reject it, and the agent reads
the rejections before the attempts. 400 attempts to a blocked port 25 cross
the default `burst` threshold (300 a minute) on the way, so the VM's rules are
rewritten for the throttle mid-run: the rewrite hands counters on without
counting an attempt twice (iptables did: its blocked count doubled)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conftest import lab_with_agent, require_root, send


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_blocked_never_exceeds_attempts_in_a_scrape(tmp_path: Path, backend: str) -> None:
    require_root()
    with lab_with_agent(tmp_path, 1, routed=1, enforce=True, backend=backend) as (lab, agent):
        sender = threading.Thread(target=send, args=(lab, "rvm1", 400),
                                  kwargs={"port": 25, "rate": 200, "timeout": 2})
        sender.start()
        pairs = []
        while sender.is_alive() or not pairs:
            m = agent.metrics()
            blocked = sum(v for k, v in m.get("smtpguard_smtp_blocked_attempts_total", {})
                          .items() if ("vm", "rvm1") in k)
            attempts = sum(v for k, v in m.get("smtpguard_smtp_connection_attempts_total", {})
                           .items() if ("vm", "rvm1") in k)
            pairs.append((blocked, attempts))
        sender.join()
        assert all(b <= a for b, a in pairs), [p for p in pairs if p[0] > p[1]]
        assert len(pairs) >= 3 and pairs[-1][0] > 0
