"""The iptables rendering and the backend choice: pure logic, no kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpguard.enforce import iptables_render as R
from smtpguard.enforce.desired import Action, Desired
from smtpguard.enforce.select import choose
from smtpguard.errors import BackendUnavailable, EnforcerError
from smtpguard.policy import load_text
from smtpguard.policy.classes import Ceiling
from smtpguard.policy.units import Rate

GOLDEN = Path(__file__).parent / "golden" / "iptables.rules"
NOW = 1_800_000_000.0
POLICY = load_text("""version: 1
relays: [198.51.100.25/32, "2001:db8:25::/64"]
classes:
  default: {}
  verified: {port25: limit, limit: {rate: 600/hour, burst: 20},
             throttle: {rate: 1/minute, burst: 2}}
members: [{class: verified, tenant: acme}]
""")
DESIRED = Desired(POLICY, {"vnet1": "default", "vnet2": "verified", "tap7i0": "default"},
                  {"vnet1": Action("block", NOW + 3600.4), "vnet2": Action("throttle")})


def render_all() -> str:
    return "".join(R.restore_text(DESIRED, fam, NOW) for fam in R.FAMILIES)


def test_ruleset_matches_golden() -> None:
    """The rules a policy gives change only on purpose (regenerate the golden
    file with SMTPGUARD_REGOLD=1 when they should)."""
    import os

    if os.environ.get("SMTPGUARD_REGOLD") == "1":
        GOLDEN.write_text(render_all())
    assert render_all() == GOLDEN.read_text()


def test_vm_chain_semantics() -> None:
    """A VM's rules do not depend on its state: a block rejects every SMTP
    port while the interface is in the block set; while it is in the
    throttle set, its chain goes to its throttle chain, whose tighter
    ceiling applies on every port not blocked instead of the class's; the
    class blocks 25 (ahead of the throttle, so in every state but a block)
    and limits the submission ports. The state is in the sets, timed to the
    second."""
    chains = R.chains(DESIRED, "ipv4", NOW)
    blocked = chains[R.vm_chain("vnet1")]
    routed = [r for r in blocked if not r.by_port]
    # every state rule twice: the set looked up by input interface, then by bridge port
    assert [(r.tag, r.by_port) for r in blocked[:2]] == [("block/25", False), ("block/25", True)]
    assert [r for r in blocked if r.by_port] == [
        R.replace(r, by_port=True) for r in routed if r.state]
    assert [(r.tag, r.state) for r in routed[:5]] == [
        ("block/25", "block"), ("block/465", "block"), ("block/587", "block"),
        ("block/2525", "block"), ("port25/25", None)]  # the class's: in every state
    assert [(r.tag, r.state, r.target) for r in routed[5:]] == [
        ("throttled", "throttle", R.throttle_chain("vnet1")), ("limit/465", None, "REJECT"),
        ("limit/587", None, "REJECT"), ("limit/2525", None, "REJECT")]
    assert routed[5].goto  # the throttle chain's end ends the judgement: no class ceiling
    assert [(r.tag, r.state) for r in chains[R.throttle_chain("vnet1")]] == [
        ("throttle/465", None), ("throttle/587", None), ("throttle/2525", None)]
    throttled = [r.tag for r in chains[R.vm_chain("vnet2")] if not r.by_port]
    assert throttled == ["block/25", "block/465", "block/587", "block/2525", "throttled",
                         "limit/25", "limit/465", "limit/587", "limit/2525"]
    assert [r.tag for r in chains[R.throttle_chain("vnet2")]] == [
        "throttle/25", "throttle/465", "throttle/587", "throttle/2525"]
    assert [r.comment("ipv4") for r in blocked if r.state == "block"] == [
        r.comment("ipv4") for r in chains[R.vm_chain("tap7i0")] if r.state == "block"]
    assert R.set_state(DESIRED, NOW) == {"vnet1": ("block", 1_800_003_601),  # rounded up
                                         "vnet2": ("throttle", None)}
    # One bucket per VM, shared by its limited ports; another VM has its own.
    lim = {r.limit.name for r in blocked if r.limit and r.tag.startswith("limit")}
    other = {r.limit.name for r in chains[R.vm_chain("tap7i0")]
             if r.limit and r.tag.startswith("limit")}
    assert len(lim) == 1 and len(other) == 1 and lim != other
    # Interfaces not seen yet: the default class, limited per source address.
    assert all(r.limit.per_source for r in chains[R.DEFAULT_CHAIN] if r.limit)


def made_afresh(ifname: str, cls: str, fam: R.Family) -> dict[str, list[R.Rule]]:
    """A VM's two chains made rule by rule for this VM: its own buckets and
    throttle chain from the start, no class chain, no copies, no memos."""
    own = R._class_rules(cls, POLICY, ifname, False, fam)
    if POLICY.mode_of(cls) == "audit":
        return {R.throttle_chain(ifname): [], R.vm_chain(ifname): own}
    block, jumps, throttle = R._action_rules(ifname, POLICY.classes[cls], POLICY, fam)
    return {R.throttle_chain(ifname): throttle,
            R.vm_chain(ifname): block + [r for r in own if not r.limit] + jumps +
            [r for r in own if r.limit]}


def test_vm_chains_copied_from_their_class_are_the_rules_made_afresh() -> None:
    """Each VM's chain is its class's with the VM's buckets and throttle chain
    written in (rule copies with their digest text substituted): the same
    rules, bucket names and comments (digests) as making every rule for the
    VM on its own."""
    for fam in R.FAMILIES:
        rendered = R.chains(DESIRED, fam, NOW)
        for ifname, cls in R.vm_ifaces(DESIRED).items():
            for name, fresh in made_afresh(ifname, cls, fam).items():
                copied = rendered[name]
                assert copied == fresh, name
                assert [r.comment(fam) for r in copied] == [r.comment(fam) for r in fresh], name
            alone = R.vm_chains(ifname, cls, POLICY, fam)  # the class chain made for it alone
            for name, rules in alone.items():
                assert rules == rendered[name], name
                assert [r.comment(fam) for r in rules] == [
                    r.comment(fam) for r in rendered[name]], name
        # the two VMs of one class share no bucket: the copies were renamed
        assert {r.limit.name for r in rendered[R.vm_chain("vnet1")] if r.limit}.isdisjoint(
            r.limit.name for r in rendered[R.vm_chain("tap7i0")] if r.limit)


def test_dispatch_relays_first_known_vms_then_patterns() -> None:
    rules = R.dispatch_rules(DESIRED, "ipv6")
    assert [r.dst for r in rules[:1]] == ["2001:db8:25::/64"]
    assert [(r.iface, r.physdev) for r in rules[1:3]] == [("tap7i0", None), (None, "tap7i0")]
    assert all(r.goto for r in rules[1:])  # a VM's chain ends the judgement
    assert [r.iface for r in rules if r.tag == "unknown" and r.iface] == [
        "fc-+", "macvtap+", "tap+", "veth+", "vnet+"]


def test_expired_action_renders_nothing() -> None:
    d = Desired(POLICY, {"vnet1": "default"}, {"vnet1": Action("block", NOW - 1)})
    assert R.set_state(d, NOW) == {}


def test_comments_carry_tag_until_and_digest() -> None:
    """A rule's comment names what it counts, and changes whenever the rule does."""
    r = R.Rule("block/25", "REJECT", dport=25, until=1_800_000_100)
    assert R.parse_comment(r.comment("ipv4"))[:2] == ("block/25", 1_800_000_100)
    assert r.comment("ipv4") != R.Rule("block/25", "REJECT", dport=25,
                                       until=1_800_000_101).comment("ipv4")
    assert R.parse_comment("something else") is None
    assert R.parse_tally(R.tally_rule("veth-a:b", "limit/587").tag) == ("veth-a:b", "limit/587")
    assert R.counted("throttle/465") == ("throttle", 465) and R.counted("throttled") is None


def test_datestop_is_the_last_second_that_matches() -> None:
    assert R.datestop(1_800_000_000) == "2027-01-15T07:59:59"  # 1_800_000_000 is 08:00:00 UTC


@pytest.mark.parametrize("rate,per,want", [
    (20, 60, "20/min"), (60, 60, "1/sec"), (100, 3600, "100/hour"), (7, 600, "42/hour"),
    (1, 86400 * 7, "1/day"), (1000, 1, "1000/sec")])
def test_hashlimit_rates(rate: int, per: int, want: str) -> None:
    assert R.hashlimit_rate(Ceiling(rate=Rate(rate, per), burst=1)) == want


def test_more_ports_than_one_multiport_match_holds() -> None:
    ports = ", ".join(str(p) for p in range(2000, 2020))
    pol = load_text("version: 1\nsmtp_ports: [" + ports + "]\n"
                    "classes: {default: {limited_ports: []}}")
    jumps = R.hook_rules(pol)
    assert [len(j.syn_ports) for j in jumps] == [15, 5]


def test_actions_read_back_from_the_sets() -> None:
    """Any element of an interface says what is in force (a block over a
    throttle); an interface whose four elements differ is named to repair."""
    from smtpguard.enforce.ipset_state import IpsetState

    read: dict[str, dict[str, list[tuple[str, int | None, bool]]]] = {
        fam: {"a": [("block", 200, False), ("block", 200, True)],
              "b": [("throttle", None, False), ("throttle", None, True)]}
        for fam in ("ipv4", "ipv6")}
    read["ipv6"]["c"] = [("block", None, True)]  # lost elsewhere by hand
    state, odd = IpsetState.state(read)
    assert R.actions_of(state) == {"a": Action("block", 200.0), "b": Action("throttle", None),
                                   "c": Action("block", None)}
    assert odd == {"c"}


class Made:
    def __init__(self, name: str) -> None:
        self.name = name


def nft_ok() -> Made:
    return Made("nftables")


def nft_missing() -> Made:
    raise BackendUnavailable("python3-nftables is not importable")


def nft_broken() -> Made:
    raise EnforcerError("applying: some other failure")


def test_auto_prefers_nftables() -> None:
    assert choose("auto", nft_ok, lambda: Made("iptables"), lambda: True).name == "nftables"


def test_auto_falls_back_only_where_legacy_tables_are_in_use() -> None:
    """auto never creates iptables-legacy tables: with nftables unavailable it
    takes iptables only when the host already runs it, else a clear error."""
    made: list[str] = []

    def ipt() -> Made:
        made.append("iptables")
        return Made("iptables")

    assert choose("auto", nft_missing, ipt, lambda: True).name == "iptables"
    with pytest.raises(EnforcerError, match="no iptables-legacy tables"):
        choose("auto", nft_missing, ipt, lambda: False)
    assert made == ["iptables"]  # not even constructed the second time


def test_only_a_not_available_error_falls_back() -> None:
    with pytest.raises(EnforcerError, match="some other failure"):
        choose("auto", nft_broken, lambda: Made("iptables"), lambda: True)


def test_explicit_choices_are_honoured() -> None:
    assert choose("iptables", nft_ok, lambda: Made("iptables"), lambda: False).name == "iptables"
    with pytest.raises(BackendUnavailable):
        choose("nftables", nft_missing, lambda: Made("iptables"), lambda: True)


def test_kernel_ready_loads_then_names_what_is_missing(tmp_path: Path) -> None:
    """The unit cannot load modules: a host without iptables-legacy loaded
    gets one error saying what to load, after one attempt to load it."""
    from smtpguard.enforce.iptables import kernel_ready

    loads: list[int] = []
    with pytest.raises(BackendUnavailable, match=r"no ip_tables_names, ip6_tables_names in "
                       r"/proc/net\) .* `modprobe -a ip_tables iptable_filter ip6_tables "
                       r"ip6table_filter ip_set ip_set_hash_netiface xt_set`"):
        kernel_ready(tmp_path, lambda: loads.append(1))
    assert loads == [1]

    def load() -> None:  # what modprobe does: the kernel's files appear
        for name in ("ip_tables_names", "ip6_tables_names"):
            (tmp_path / name).write_text("")

    kernel_ready(tmp_path, load)
    kernel_ready(tmp_path, lambda: pytest.fail("loaded already: no modprobe"))
