"""Rendering the policy into nftables JSON: pure, no kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from smtpguard.enforce import render
from smtpguard.enforce.desired import Action, Capabilities, Desired
from smtpguard.enforce.fake import FakeEnforcer
from smtpguard.enforce.keeper import Keeper
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy import Policy, load_text
from smtpguard.policy.classes import Ceiling
from smtpguard.policy.units import parse_rate

GOLDEN = Path(__file__).parent / "golden" / "ruleset.json"


def test_rendered_default_ruleset_matches_golden() -> None:
    """The rules for the built-in default change only on purpose
    (SMTPGUARD_REGOLD=1 rewrites the golden file)."""
    desired = Desired(Policy(), {"vnet3": "default"}, {"vnet4": Action("throttle")},
                      hooks={"tap5": "ingress", "macvtap0": "egress"})
    cmds = []
    for fam in render.FAMILIES:
        cmds += render.table_commands(fam, desired, Capabilities(False, True), None, now=0)
    text = json.dumps(cmds, indent=1, sort_keys=True) + "\n"
    if os.environ.get("SMTPGUARD_REGOLD") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_interface_patterns_become_prefix_wildcards() -> None:
    assert render.iface_wildcards(Policy()) == ["fc-*", "macvtap*", "tap*", "veth*", "vnet*"]
    p = load_text("version: 1\n"
                  "interfaces: {patterns: [{pattern: 'veth*'}, {pattern: 'vethab{vm}'}, "
                  "{pattern: exact0}]}")
    assert render.iface_wildcards(p) == ["exact0", "veth*"]


@pytest.mark.parametrize(("rate", "want"), [
    ("20/minute", (20, "minute")), ("2.5/minute", (150, "hour")), ("100/10m", (10, "minute")),
    ("1/day", (1, "day")), ("5/second", (5, "second")), ("1000/s", (1000, "second")),
])
def test_rates_become_integer_nft_limits(rate: str, want: tuple[int, str]) -> None:
    lim = render.nft_limit(Ceiling(rate=parse_rate(rate), burst=3))["limit"]
    assert (lim["rate"], lim["per"], lim["burst"], lim["inv"]) == (*want, 3, True)


def ports_of(rules: list[list[object]]) -> list[object]:
    """The ports each verdict rule judges (the shared-ceiling rules of VMs
    with several interfaces repeat the meter's ports: left out)."""
    return [r[0]["match"]["right"] for r in rules  # type: ignore[index]
            if r[0]["match"]["left"] != render.IIF  # type: ignore[index]
            and not any(isinstance(e, dict) and "limit" in e for e in r)]


@pytest.mark.parametrize(("mode", "plain", "throttled"), [
    ("block", [25, {"set": [465, 587]}], [25, {"set": [465, 587, 2525]}]),
    ("limit", [{"set": [25, 465, 587]}], [{"set": [25, 465, 587, 2525]}]),
    ("allow", [{"set": [465, 587]}], [{"set": [25, 465, 587, 2525]}]),
])
def test_port25_modes_and_throttle_ports(mode: str, plain: list[object],
                                         throttled: list[object]) -> None:
    """block rejects 25 outright (also when throttled); limit puts 25 under the
    ceiling; a throttle puts every SMTP port not blocked under the tighter one."""
    pol = load_text("version: 1\n"
                    f"classes: {{default: {{port25: {mode}, limited_ports: [465, 587]}}}}")
    chains = render.chains(Desired(pol), "inet", Capabilities())
    assert ports_of(chains["class_default"]) == plain
    assert ports_of(chains["throttle_default"]) == throttled


def test_verdict_is_reject_where_the_family_can_else_drop() -> None:
    chains = render.chains(Desired(Policy()), "bridge", Capabilities(False, True))
    assert chains["reject_block"][-1][-1] == {"drop": None}
    chains = render.chains(Desired(Policy()), "inet", Capabilities(False, True))
    assert chains["reject_block"][-1][-1] == {"reject": {"type": "tcp reset"}}


def test_state_elements_carry_remaining_time_and_skip_expired() -> None:
    actions = {"a": Action("block", 100.2), "b": Action("throttle"), "c": Action("block", 50)}
    elems = render.state_elements(actions, {"b": "gold"}, "default", now=60)
    assert elems == [
        [{"elem": {"val": "a", "timeout": 41}}, {"goto": {"target": "block"}}],
        ["b", {"goto": {"target": "throttle_gold"}}],
    ]


def test_unchanged_sets_are_kept_changed_ones_recreated_foreign_pruned() -> None:
    """Counters and limiter state survive a re-apply; a set whose definition
    changed is recreated; our objects the policy no longer has are removed."""
    desired = Desired(Policy())
    sets = render.sets(desired)
    observed = {
        "sets": {"cnt_block": {**sets["cnt_block"], "flags": ["dynamic"]},
                 "lim_default": {**sets["lim_default"], "size": 10},
                 "lim_gone": sets["lim_default"], "seen4": {"type": "x"}},
        "chains": {"smtp", "class_gone"},
    }
    cmds = render.table_commands("inet", desired, Capabilities(), observed, now=0)
    adds = [c["add"]["set"]["name"] for c in cmds if "set" in c.get("add", {})]
    deletes = [c["delete"] for c in cmds if "delete" in c]
    assert "cnt_block" not in adds and "lim_default" in adds
    assert {"set": {"family": "inet", "table": "smtpguard", "name": "lim_default"}} in deletes
    assert {"set": {"family": "inet", "table": "smtpguard", "name": "lim_gone"}} in deletes
    assert {"chain": {"family": "inet", "table": "smtpguard", "name": "class_gone"}} in deletes
    assert not any(d.get("set", {}).get("name") == "seen4" for d in deletes)


def vif(ifindex: int, ifname: str, vm: str, tenant: str | None = None) -> VmIface:
    return VmIface(ifindex, ifname, vm, "x", tenant)


def test_keeper_classes_vms_and_adopts_kernel_actions() -> None:
    """Without a store, start adopts the blocks the kernel holds on a present
    VM's interface, never one on a name no VM has now; VMs get classes by the
    policy's members; vanished interfaces lose their elements and counters."""
    pol = load_text("version: 1\nclasses: {default: {}, gold: {}}\n"
                    "members: [{class: gold, tenant: acme}]")
    fake = FakeEnforcer()
    fake.state = {"vnet1": Action("block"), "vnet9": Action("block")}
    keeper = Keeper(fake, pol)
    keeper.start({1: vif(1, "vnet1", "a"), 2: vif(2, "vnet2", "b", "acme")})
    assert fake.applied[-1].classes == {"vnet1": "default", "vnet2": "gold"}
    assert fake.applied[-1].actions == {"vnet1": Action("block")}
    assert keeper.vm_actions == {"a": Action("block")}
    keeper.ifaces_changed({1: vif(1, "vnet1", "a")})
    keeper.flush()
    assert fake.classes == {"vnet1": "default"} and fake.forgotten == {"vnet2"}


def test_the_store_decides_and_the_kernel_follows_the_vm() -> None:
    """With the store's records as the truth, a stale element (another VM's
    block left on a name) is not adopted; a blocked VM that comes back on
    another interface is blocked there at once, its old name is cleared, and a
    new VM given the freed name starts clean."""
    fake = FakeEnforcer()
    fake.state = {"vnet0": Action("block")}  # left by a VM that is gone
    keeper = Keeper(fake, Policy())
    keeper.start({1: vif(1, "vnet0", "newcomer")}, truth={"web": Action("block")})
    assert fake.state == {}
    keeper.ifaces_changed({1: vif(1, "vnet0", "newcomer"), 2: vif(2, "vnet1", "web")})
    assert fake.state == {"vnet1": Action("block")}
    keeper.ifaces_changed({3: vif(3, "vnet1", "other"), 4: vif(4, "vnet2", "web")})
    assert fake.state == {"vnet2": Action("block")}
    keeper.set_action("web", None)
    assert fake.state == {}
    keeper.set_action("gone", Action("block"))  # a VM with no interface now
    assert fake.state == {}
    keeper.ifaces_changed({5: vif(5, "vnet7", "gone")})
    assert fake.state == {"vnet7": Action("block")}


def test_a_vm_with_two_nics_is_one_vm() -> None:
    """One class for the VM, whatever an interface rule says of one NIC, and
    its block on both."""
    pol = load_text("version: 1\nclasses: {default: {}, gold: {}}\n"
                    "members: [{class: gold, interface: 'vnet1'}]")
    fake = FakeEnforcer()
    keeper = Keeper(fake, pol)
    keeper.start({1: vif(1, "vnet1", "db"), 2: vif(2, "vnet2", "db")})
    assert fake.applied[-1].classes == {"vnet1": "gold", "vnet2": "gold"}
    keeper.set_action("db", Action("throttle"))
    assert fake.state == {"vnet1": Action("throttle"), "vnet2": Action("throttle")}


def test_verify_repairs_what_the_kernel_lost_or_gained() -> None:
    """The periodic comparison of records and kernel: a hand-deleted element
    comes back, a foreign one goes, each counted by kind."""
    t = [0.0]
    fake = FakeEnforcer()
    keeper = Keeper(fake, Policy(), clock=lambda: t[0], repair_every=10)
    keeper.start({1: vif(1, "vnet1", "a"), 2: vif(2, "vnet2", "b")}, truth={})
    keeper.set_action("a", Action("block"))
    del fake.state["vnet1"]
    fake.state["vnet2"] = Action("throttle")
    assert keeper.verify()
    assert fake.state == {"vnet1": Action("block")}
    assert keeper.repairs == {"missing": 1, "unexpected": 1, "changed": 0}
    assert not keeper.verify()


def test_keeper_repairs_missing_or_emptied_tables() -> None:
    t = [0.0]
    fake = FakeEnforcer()
    keeper = Keeper(fake, Policy(), clock=lambda: t[0], repair_every=10)
    keeper.start({})
    fake.tables["inet"] = None
    keeper.repair()
    assert len(fake.applied) == 1  # not yet: the repair interval has not passed
    t[0] = 11
    keeper.repair()
    assert len(fake.applied) == 2 and fake.tables["inet"] is not None
    fake.tables["bridge"] = {"rules": 0}  # flushed behind our back
    t[0] = 22
    keeper.repair()
    assert len(fake.applied) == 3
