"""Live policy reloads: a valid policy replaces the old one in one step, an
invalid one is rejected and the running policy stays in force."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import AgentProc, lab_with_agent, require_root, send

ATTEMPTS = "smtpguard_smtp_connection_attempts_total"


def good(i: int) -> str:
    return (f"version: 1\nsmtp_ports: [25, {30000 + i}]\n"
            "classes: {default: {limited_ports: []}}\n")


def bad(i: int) -> str:
    return f"version: 1\nsmtp_ports: [25, {30000 + i}, 25]\n"


def write(path: Path, text: str, atomic: bool) -> None:
    """Both ways editors save: in place, or a new file renamed over the old."""
    if atomic:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    else:
        path.write_text(text)


def test_100_alternating_rewrites_keep_the_last_good_policy(tmp_path: Path) -> None:
    """Each rewrite is noticed (no reload missed): good ones are applied with
    the generation going up by one, bad ones rejected with located errors; at
    the end the last good policy is the one the datapath enforces."""
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(good(0))
    with lab_with_agent(tmp_path, 1, policy) as (lab, agent):
        generation = 1
        rejected = 0
        for i in range(1, 101):
            if i % 2:
                write(policy, good(i), atomic=i % 4 == 1)
                generation += 1
                agent.wait_event("policy.reloaded", policy_generation=generation)
            else:
                write(policy, bad(i), atomic=i % 4 == 0)
                rejected += 1
                ev = wait_nth(agent, "policy.rejected", rejected)
                assert ev["policy_generation"] == generation
                assert ev["errors"] == [f"{policy}:2:13: smtp_ports: ports are listed more "
                                        "than once"]
        m = agent.metrics()
        assert m["smtpguard_policy_generation"][()] == 51
        reloads = m["smtpguard_policy_reloads_total"]
        assert reloads[(("result", "applied"),)] == 50
        assert reloads[(("result", "rejected"),)] == 50
        # The last good policy (i = 99) counts port 30099; i = 97's port is no longer SMTP.
        assert send(lab, "vm1", 2, port=30099) == {"refused": 2}
        assert send(lab, "vm1", 2, port=30097) == {"refused": 2}
        assert agent.counter(ATTEMPTS, vm="vm1", port="30099") == 2
        assert agent.counter(ATTEMPTS, vm="vm1", port="30097") == 0


def wait_nth(agent: AgentProc, name: str, n: int) -> dict[str, object]:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        evs = [e for e in agent.events()[agent._mark:] if e.get("event") == name]
        if len(evs) >= n:
            return evs[n - 1]
        time.sleep(0.05)
    raise AssertionError(f"only {len(evs)} {name} events, wanted {n}")


def test_sighup_reloads_and_a_broken_file_keeps_the_running_policy(tmp_path: Path) -> None:
    """SIGHUP re-reads the file; a policy that turns invalid (even unreadable)
    is rejected and the agent keeps counting under the old one."""
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(good(1))
    with lab_with_agent(tmp_path, 1, policy) as (lab, agent):
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_event("policy.reloaded", policy_generation=2)
        policy.unlink()
        ev = agent.wait_event("policy.rejected")
        assert "No such file or directory" in ev["errors"][0]
        assert send(lab, "vm1", 3, port=30001) == {"refused": 3}
        assert agent.counter(ATTEMPTS, vm="vm1", port="30001") == 3


def test_an_emptied_policy_file_is_rejected_and_the_running_policy_stays(
        tmp_path: Path) -> None:
    """A truncated write (config management leaving an empty or comment-only
    file) is one located error, not "all defaults": the running policy, with
    its extra SMTP port, stays in force."""
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(good(2))
    with lab_with_agent(tmp_path, 1, policy) as (lab, agent):
        for n, text in enumerate(["", "# smtpguard policy, being rewritten\n"], start=1):
            write(policy, text, atomic=n == 2)
            ev = wait_nth(agent, "policy.rejected", n)
            assert ev["errors"] == [f"{policy}:1:1: version: required, and this file is "
                                    "empty (only comments or whitespace)"]
            assert ev["policy_generation"] == 1
        assert send(lab, "vm1", 2, port=30002) == {"refused": 2}
        assert agent.counter(ATTEMPTS, vm="vm1", port="30002") == 2
