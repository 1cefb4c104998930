"""Which backend the agent picks on its own (`--backend auto`, the default),
with a real agent in a lab: nftables where it works, iptables-legacy only
where the host already runs it, and never a legacy table created by the
automatic choice (one costs 11% of bridged small-packet throughput here, and
stays until reboot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import lab_with_agent, require_root, send
from smtpguard.lab import topology
from smtpguard.netns import run_in

# nftables made unavailable the way a host without python3-nftables is.
WITHOUT_NFTABLES = [sys.executable, "-c", "import sys; sys.modules['nftables'] = None; "
                    "from smtpguard.cli import main; sys.exit(main())"]


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
