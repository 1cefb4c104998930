"""One VM offering SMTP SYNs as fast as this machine makes them (a raw
socket, every SYN a new attempt), while another VM sends mail: every attempt
is counted exactly, the ceiling holds, the other VM's mail flows, and the
agent's loop keeps running (its heartbeat never goes stale)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kit import lab_with_agent, require_root, scale, send
from smtpguard.lab.synflood import dropped, flood

SYNS = scale(300_000, 40_000)
ATTEMPTS = "smtpguard_smtp_connection_attempts_total"
BLOCKED = "smtpguard_smtp_blocked_attempts_total"
POLICY = """
version: 1
classes:
  default:
    port25: block
    limit: {rate: 600/minute, burst: 20}
    limited_ports: [465, 587, 2525]
    thresholds: []
"""


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_syn_flood_is_counted_exactly_and_limited_while_others_mail(tmp_path: Path,
                                                                    backend: str) -> None:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with lab_with_agent(tmp_path, 1, policy, routed=1, enforce=True,
                        backend=backend) as (lab, agent):
        before = agent.counter(ATTEMPTS, vm="rvm1", port="587")
        other: dict[str, Any] = {}
        mailer = threading.Thread(target=lambda: other.update(
            r=send(lab, "vm1", 5, port=587, dialog="mail", rate=2)))
        mailer.start()
        lost = dropped()
        sent, seconds = flood(lab, "rvm1", SYNS, 587)
        mailer.join()
        time.sleep(1)
        lost = dropped() - lost  # before the classifier (input backlog full)
        counted = agent.counter(ATTEMPTS, vm="rvm1", port="587") - before
        rejected = agent.counter(BLOCKED, vm="rvm1", port="587", reason="limit")
        # nftables: rejected beyond its dedup memory are counted as overflow (defined).
        rejected += agent.counter("smtpguard_nft_overflow_total")
        accepted = counted - rejected
        allowed = 20 + (seconds + 1) * 10  # burst + 600/minute over the flood
        m = agent.metrics()
        stale = time.time() - m["smtpguard_last_loop_timestamp_seconds"][()]
        loops = m["smtpguard_loop_duration_seconds_count"][()]
        slow = loops - m["smtpguard_loop_duration_seconds_bucket"][(("le", "0.25"),)]
        print(f"\nload ({backend}): offered {sent} SYNs in {seconds:.2f}s "
              f"({sent / seconds:,.0f}/s), dropped by the kernel before tc {lost}, "
              f"counted {counted:.0f}, accepted {accepted:.0f} "
              f"(ceiling allows {allowed:.0f}), other VM {other['r']}, detection loops "
              f"{loops:.0f}, slower than 0.25 s: {slow:.0f}")
        assert sent - lost <= counted <= sent  # every attempt that arrived, none twice
        assert accepted <= allowed
        assert other["r"] == {"completed": 5}
        assert stale < 10  # the loop still runs: the watchdog stays fed
