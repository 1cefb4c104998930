"""Which backend the agent picks on its own (`--backend auto`, the default),
with a real agent in a lab: nftables where it works, iptables-legacy only
where the host already runs it, and never a legacy table created by the
automatic choice (one costs 11% of bridged small-packet throughput here, and
stays until reboot)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from conftest import lab_with_agent, require_root, send
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology

# nftables made unavailable the way a host without python3-nftables is.
WITHOUT_NFTABLES = [sys.executable, "-c", "import sys; sys.modules['nftables'] = None; "
                    "from smtpguard.cli.main import main; sys.exit(main())"]


def legacy_tables(lab: topology.Lab) -> str:
    """The iptables-legacy tables that exist in the lab's hypervisor namespace."""
    def read() -> str:
        return "".join(Path(f"/proc/thread-self/net/{n}").read_text()
                       for n in ("ip_tables_names", "ip6_tables_names"))

    return run_in(lab.hv, read)


def test_auto_takes_nftables_and_creates_no_legacy_table(tmp_path: Path) -> None:
    require_root()
    with lab_with_agent(tmp_path, 1, routed=1, enforce=True) as (lab, agent):
        ev = agent.wait_event("enforce.backend")
        assert (ev["backend"], ev["requested"]) == ("nftables", "auto")
        assert send(lab, "rvm1", 1, port=25, timeout=2) == {"refused": 1}
        agent.stop()
        agent.cleanup()  # removes both backends' objects, creates neither
        assert legacy_tables(lab) == ""


def test_auto_without_nftables_refuses_to_create_legacy_tables(tmp_path: Path) -> None:
    """No nftables and no legacy tables in use: a one-line error and a
    non-zero exit, nothing created."""
    require_root()
    with lab_with_agent(tmp_path, 1, enforce=True, start=False,
                        launcher=WITHOUT_NFTABLES) as (lab, agent):
        out = subprocess.run(agent.args(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("smtpguard: nftables is not available (python3-nftables"), last
        assert "--backend iptables" in last
        assert legacy_tables(lab) == ""


def test_auto_without_nftables_runs_iptables_where_it_is_in_use(tmp_path: Path) -> None:
    """A host already on iptables-legacy (its tables exist) and without
    nftables: the agent falls back to iptables, says so, and enforces."""
    require_root()
    with lab_with_agent(tmp_path, 1, routed=1, enforce=True, start=False,
                        launcher=WITHOUT_NFTABLES) as (lab, agent):
        subprocess.run(["ip", "netns", "exec", lab.hv, "iptables-legacy", "-L", "-n"],
                       check=True, capture_output=True)  # the host's own firewall
        agent.start()
        fallback = agent.wait_event("enforce.backend_fallback")
        assert "python3-nftables" in fallback["reason"]
        assert agent.wait_event("enforce.backend")["backend"] == "iptables"
        assert send(lab, "rvm1", 2, port=25, timeout=2) == {"refused": 2}
        assert send(lab, "vm1", 1, port=25, timeout=2) == {"refused": 1}


def nft_tables(lab: topology.Lab) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "list", "tables"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def smtpg_rules(lab: topology.Lab) -> int:
    """Lines of ours (SMTPG chains, jumps to them) in iptables-legacy, v4 and v6,
    without creating a legacy table to look."""
    if not legacy_tables(lab):
        return 0
    n = 0
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        out = subprocess.run(["ip", "netns", "exec", lab.hv, tool, "-S"],
                             capture_output=True, text=True, check=True).stdout
        n += sum("SMTPG" in line for line in out.splitlines())
    return n


def test_switching_backends_removes_the_other_ones_objects(tmp_path: Path) -> None:
    """nftables, then a restart with --backend iptables, then back: each start
    removes the other backend's smtpguard objects (logged as one event), so the
    running backend alone sees the SYNs: it counts the rejections and its
    release releases. A foreign nftables table is left alone."""
    require_root()
    with lab_with_agent(tmp_path, 1, routed=1, enforce=True, backend="nftables") as (
            lab, agent):
        subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "add", "table", "inet",
                        "hostfw"], check=True)
        assert send(lab, "rvm1", 1, port=25, timeout=2) == {"refused": 1}
        agent.ctl("block", "rvm1", "--for", "1h", "--reason", "switch test")
        assert send(lab, "rvm1", 1, port=587, timeout=2) == {"refused": 1}
        agent.stop()
        assert "table inet smtpguard" in nft_tables(lab)  # a stop leaves enforcement

        agent.backend = "iptables"
        agent.start()
        ev = agent.wait_event("enforce.other_backend_removed")
        assert (ev["backend"], ev["other"]) == ("iptables", "nftables")
        assert nft_tables(lab) == ["table inet hostfw"]
        assert smtpg_rules(lab) > 0
        assert send(lab, "rvm1", 2, port=25, timeout=2) == {"refused": 2}
        deadline = time.monotonic() + 10
        while agent.counter("smtpguard_smtp_blocked_attempts_total", vm="rvm1") < 2:
            assert time.monotonic() < deadline, "the iptables backend saw no rejection"
            time.sleep(0.2)
        agent.ctl("release", "rvm1")
        assert send(lab, "rvm1", 1, port=587, timeout=2) == {"completed": 1}
        agent.stop()

        agent.backend = "nftables"
        agent.start()
        ev = agent.wait_event("enforce.other_backend_removed")
        assert (ev["backend"], ev["other"]) == ("nftables", "iptables")
        assert smtpg_rules(lab) == 0
        assert send(lab, "rvm1", 1, port=25, timeout=2) == {"refused": 1}
        assert send(lab, "rvm1", 1, port=587, timeout=2) == {"completed": 1}
        assert "table inet hostfw" in nft_tables(lab)


def test_a_start_with_one_backend_leaves_no_event_when_there_is_nothing_else(
        tmp_path: Path) -> None:
    """Nothing of the other backend's: no removal event, no legacy table created."""
    require_root()
    with lab_with_agent(tmp_path, 1, routed=1, enforce=True, backend="nftables") as (
            lab, agent):
        agent.wait_event("enforce.applied")
        assert agent.events("enforce.other_backend_removed") == []
        assert legacy_tables(lab) == ""
