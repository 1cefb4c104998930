"""The iptables backend keeps blocks and throttles in ipsets: real packets
from a bridged VM (br_netfilter, looked up by bridge port) and a routed tap
(by input interface), with the table never replaced for a block or release,
and a restore of saved rules (which cannot carry the bridge-port lookup)
caught as drift and repaired."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import AgentProc, lab_with_agent, require_root, send
from smtpguard.daemon.netns import run_in
from smtpguard.enforce.ipset_state import IpsetState
from smtpguard.lab import topology

POLICY = """
version: 1
classes:
  default:
    port25: limit
    limit: {rate: 60/minute, burst: 10}
    limited_ports: [465, 587, 2525]
    thresholds: []
"""
Pair = tuple[topology.Lab, AgentProc]


@pytest.fixture
def enforced(tmp_path: Path) -> Iterator[Pair]:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with lab_with_agent(tmp_path, 1, policy, routed=1, enforce=True,
                        backend="iptables") as pair:
        pair[1].wait_event("enforce.applied", backend="iptables")
        yield pair


def hv(lab: topology.Lab, *cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", lab.hv, *cmd], capture_output=True,
                          text=True, check=True, input=stdin).stdout


def generation(lab: topology.Lab) -> str:
    """The filter tables as the kernel holds them, counters aside: any table
    replace (which a chain edit is) shows here."""
    return "".join(ln for ln in (hv(lab, "iptables-legacy-save", "-t", "filter")
                                 + hv(lab, "ip6tables-legacy-save", "-t", "filter")
                                 ).splitlines(keepends=True) if not ln.startswith(("#", ":")))


def held(lab: topology.Lab) -> dict[str, tuple[str, int | None]]:
    return IpsetState.state(run_in(lab.hv, lambda: IpsetState().read()))[0]


def op(agent: AgentProc, *args: str) -> None:
    agent.ctl(*args)


def test_block_and_release_are_set_elements_for_bridged_and_routed(enforced: Pair) -> None:
    """A block rejects a bridged VM's and a routed tap's SYNs on every SMTP
    port; the block and the release change only our sets' elements (both
    families, routed and bridged), never the rules, whose counts stay."""
    lab, agent = enforced
    before = generation(lab)
    for vm in ("vm1", "rvm1"):
        op(agent, "block", vm, "--for", "1h", "--reason", "sets test")
    ifaces = set(held(lab))
    assert ifaces == {"veth-vm1", "veth-rvm1"}, ifaces
    assert all(k == "block" and u is not None for k, u in held(lab).values())
    assert send(lab, "vm1", 2, port=587, timeout=2) == {"refused": 2}  # bridged
    assert send(lab, "rvm1", 2, port=25, timeout=2) == {"refused": 2}  # routed
    for vm in ("vm1", "rvm1"):
        op(agent, "release", vm)
    assert held(lab) == {}
    assert send(lab, "vm1", 2, port=587) == {"completed": 2}
    assert send(lab, "rvm1", 2, port=25) == {"completed": 2}
    assert generation(lab) == before  # no rule changed, none came or went
    assert agent.counter("smtpguard_smtp_blocked_attempts_total", vm="vm1", port="587",
                         reason="block") == 2  # counted, and kept after the release


def test_a_restore_of_saved_rules_is_repaired(enforced: Pair) -> None:
    """iptables-save cannot spell the bridge-port lookup: restoring what it
    printed leaves bridged VMs' blocks idle. The agent sees it as drift and
    rewrites those rules (counts kept); the bridged block holds again."""
    lab, agent = enforced
    op(agent, "block", "vm1", "--for", "1h", "--reason", "sets test")
    assert send(lab, "vm1", 1, port=587, timeout=2) == {"refused": 1}
    saved = hv(lab, "iptables-legacy-save", "-c", "-t", "filter")
    hv(lab, "iptables-legacy-restore", "-c", stdin=saved)  # counts kept
    ev = agent.wait_event("enforce.repaired", timeout=20)
    assert ev["missing"] == ["ipv4"]
    assert send(lab, "vm1", 2, port=587, timeout=2) == {"refused": 2}
    assert agent.counter("smtpguard_smtp_blocked_attempts_total", vm="vm1", port="587",
                         reason="block") == 3


def test_rules_from_templates_are_the_rules_python_iptables_builds() -> None:
    """A full apply writes most rules as copies of the first of their shape
    with the interface, jump, bucket and comment written in: the kernel ends
    up with exactly the rules (and bridge-port lookups) that building each
    through python-iptables gives, names of every length included."""
    require_root()
    from smtpguard.enforce import iptc_raw, iptc_table
    from smtpguard.enforce.desired import Action, Desired
    from smtpguard.enforce.iptables import IptablesEnforcer
    from smtpguard.enforce.nftables import in_scratch_netns
    from smtpguard.policy import Policy

    names = [*(f"vnet{i}" for i in range(12)), "tap7i0", "tap8i1", "fc-a", "fc-b",
             "veth-abcdefghij", "veth-bbcdefghij"]
    desired = Desired(Policy(), dict.fromkeys(names, "default"),
                      {"vnet1": Action("block", None)}, {"tap7i0": "a", "fc-a": "a"})

    def rules() -> tuple[list[str], list[tuple[int, int, int]]]:
        import iptc

        IptablesEnforcer().apply(desired)
        text = subprocess.run("iptables-legacy-save -t filter; ip6tables-legacy-save -t filter",
                              shell=True, capture_output=True, text=True, check=True).stdout
        lookups = [iptc_table.XtTable(iptc, fam).by_port_lookups(f"SMTPG-V-{n}")
                   for fam in ("ipv4", "ipv6") for n in names]
        return [ln for ln in text.splitlines() if not ln.startswith("#")], lookups

    copied = in_scratch_netns(rules)
    shape = iptc_raw.shape
    try:
        iptc_raw.shape = lambda spec: None  # type: ignore[assignment] # build every rule
        built = in_scratch_netns(rules)
    finally:
        iptc_raw.shape = shape
    assert copied == built
    assert all(plain == by_port == 5 for plain, by_port, _n in copied[1])  # 4 + 1
