"""How a VM is plugged in, and what that decides: where the classifier sits,
which table enforces, and what the netdev table holds (pure, no kernel)."""

from __future__ import annotations

import json
import struct

import pytest

from smtpguard.datapath import linkdump
from smtpguard.datapath.attachment import attachment, swapped
from smtpguard.enforce import render
from smtpguard.enforce.desired import Action, Capabilities, Desired
from smtpguard.enforce.fake import FakeEnforcer
from smtpguard.enforce.keeper import Keeper
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy import Policy


@pytest.mark.parametrize("kind,master,want", [
    ("", "bridge", "bridge"),
    ("tun", "bridge", "bridge"),
    ("tun", "openvswitch", "ovs"),
    ("veth", None, "routed"),
    ("tun", None, "routed"),
    ("macvtap", None, "macvtap"),
    ("macvtap", "bridge", "macvtap"),
])
def test_attachment_from_the_kinds(kind: str, master: str | None, want: str) -> None:
    """A port of ovs-system is OVS, a macvtap is a macvtap whatever else,
    a Linux bridge port is bridged, no master is routed."""
    assert attachment(kind, master) == want


def test_only_a_macvtap_sends_through_its_transmit_path() -> None:
    assert [a for a in ("bridge", "routed", "ovs", "macvtap") if swapped(a)] == ["macvtap"]


def _attr(kind: int, payload: bytes) -> bytes:
    raw = linkdump.RTATTR.pack(4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def test_link_dump_reads_master_and_kind() -> None:
    """A link message's master ifindex and IFLA_INFO_KIND (nested in
    IFLA_LINKINFO) come out of the hand-rolled dump parser."""
    info = _attr(linkdump.IFLA_INFO_KIND, b"macvtap\0")
    msg = (linkdump.IFINFOMSG.pack(0, 1, 42, 0, 0) + _attr(linkdump.IFLA_IFNAME, b"macvtap3\0")
           + _attr(linkdump.IFLA_MASTER, struct.pack("=I", 7))
           + _attr(linkdump.IFLA_LINKINFO, info) + _attr(linkdump.IFLA_IFALIAS, b"web1\0"))
    assert linkdump.parse(memoryview(msg)) == linkdump.Link(42, "macvtap3", "web1", 7,
                                                            "macvtap")


DESIRED = Desired(Policy(), {"tap5": "default", "macvtap0": "default", "vnet1": "default"},
                  {"macvtap0": Action("block"), "tap5": Action("throttle")},
                  hooks={"tap5": "ingress", "macvtap0": "egress"})


def _text(rules: list[list[object]]) -> str:
    return json.dumps(rules)


def test_netdev_hooks_only_the_devices_others_cannot_see() -> None:
    """One base chain per OVS port (ingress) and per macvtap (egress), none
    for a bridge port; bridge and inet keep their one prerouting chain."""
    assert render.device_chains(DESIRED) == {"out_macvtap0": ("egress", "macvtap0"),
                                             "in_tap5": ("ingress", "tap5")}
    nd = render.chains(DESIRED, "netdev", Capabilities())
    assert "prerouting" not in nd and "in_tap5" in nd and "out_macvtap0" in nd
    assert nd["in_tap5"][0][-1] == {"jump": {"target": "smtp"}}
    assert nd["out_macvtap0"][0][-1] == {"jump": {"target": "o_smtp"}}
    for fam in ("bridge", "inet"):
        assert not any(render.is_device_chain(n) for n in render.chains(DESIRED, fam,
                                                                        Capabilities()))


def test_the_egress_tree_keys_on_oifname_marks_and_has_its_own_maps() -> None:
    """At a device's egress there is no input interface and no reject, and
    tc comes after netfilter: the o_ chains match oifname, mark what they
    refuse for the classifier to count and drop, and jump only within
    themselves. Without a mark configured they drop."""
    nd = render.chains(DESIRED, "netdev", Capabilities())
    egress = {n: r for n, r in nd.items() if n.startswith(render.EGRESS)}
    ingress = {n: r for n, r in nd.items() if n not in egress and not
               render.is_device_chain(n)}
    assert set(egress) == {render.EGRESS + n for n in ingress}
    text = _text([r for rules in egress.values() for r in rules])
    assert '"iifname"' not in text and '"oifname"' in text
    mark = Policy().datapath.trip_mark
    assert mark and '"reject"' not in text and '"drop"' not in text
    assert nd["o_reject_block"][-1] == [
        {"mangle": {"key": {"meta": {"key": "mark"}},
                    "value": {"|": [{"meta": {"key": "mark"}}, mark]}}}, {"accept": None}]
    targets = [t for t in text.split('"target": "')[1:]]
    assert all(t.startswith(render.EGRESS) for t in targets)
    assert "@o_vm_state" in text and "@o_vm_class" in text
    assert '"reject"' in _text([r for rules in ingress.values() for r in rules])
    no_reset = render.chains(DESIRED, "netdev", Capabilities(reject_netdev=False))
    assert no_reset["reject_block"][-1] == [{"drop": None}]
    from smtpguard.policy import load_text

    unmarked = Desired(load_text("version: 1\ndatapath: {trip_mark: 0}\n"),
                       hooks={"macvtap0": "egress"})
    assert render.chains(unmarked, "netdev", Capabilities())["o_reject_block"][-1] == [
        {"drop": None}]


def test_state_maps_send_each_tree_to_its_own_chains() -> None:
    elems = render.elements(DESIRED, now=0)
    assert ["macvtap0", {"goto": {"target": "block"}}] in elems["vm_state"]
    assert ["macvtap0", {"goto": {"target": "o_block"}}] in elems["o_vm_state"]
    assert ["tap5", {"goto": {"target": "o_throttle_default"}}] in elems["o_vm_state"]
    assert render.STATE_MAPS["netdev"] == ("vm_state", "o_vm_state")


def test_device_commands_add_the_new_and_delete_the_gone() -> None:
    """Per-VM changes touch only the device chains that differ (a chain
    re-added is flushed and given its one rule: never a duplicate)."""
    cmds = render.device_commands(DESIRED, {"in_tap5", "in_oldtap"})
    deleted = [c["delete"]["chain"]["name"] for c in cmds if "delete" in c]
    added = [c["add"]["chain"]["name"] for c in cmds if "chain" in c.get("add", {})]
    rules = [c["add"]["rule"]["chain"] for c in cmds if "rule" in c.get("add", {})]
    flushed = [c["flush"]["chain"]["name"] for c in cmds if "flush" in c]
    assert deleted == ["in_oldtap"]
    assert sorted(added) == sorted(flushed) == sorted(rules) == ["in_tap5", "out_macvtap0"]


def test_redirect_fails_closed_on_netdev_as_on_the_bridge() -> None:
    """Only the inet table can DNAT: a redirecting class blocks port 25 on
    a device hooked in the netdev table."""
    from smtpguard.policy import load_text

    pol = load_text("version: 1\nclasses:\n  default:\n    port25: redirect\n"
                    "    redirect_to: [198.51.100.25]\n")
    c = pol.classes["default"]
    assert render.port25_blocked(c, "netdev") and render.port25_blocked(c, "bridge")
    assert not render.port25_blocked(c, "inet")


def _vif(ifindex: int, ifname: str, vm: str, att: str) -> VmIface:
    return VmIface(ifindex, ifname, vm, "tap*", attachment=att)  # type: ignore[arg-type]


def test_keeper_pushes_a_changed_attachment_and_names_what_it_cannot_reach() -> None:
    """A VM moved from a Linux bridge to OVS gets its device hooked at the
    next flush; a backend that cannot reach OVS says so for that interface."""
    enf = FakeEnforcer()
    keeper = Keeper(enf, Policy())
    keeper.start({1: _vif(1, "tap1", "a", "bridge")})
    assert enf.applied[-1].hooks == {}
    keeper.ifaces_changed({1: _vif(1, "tap1", "a", "ovs")})
    assert keeper.desired().hooks == {"tap1": "ingress"}
    assert keeper.reaches(_vif(1, "tap1", "a", "ovs"))
    enf.reaches = frozenset({"bridge", "routed"})
    assert not keeper.reaches(_vif(1, "tap1", "a", "ovs"))
    assert keeper.reaches(_vif(1, "tap1", "a", "routed"))
