"""The nftables chains: the rules a SYN meets, as libnftables JSON expressions.

Where the rules hook, and why: VMs sit on Linux bridges or on routed taps.
A frame a bridged VM sends passes the bridge family's prerouting hook on its
bridge port, whether it is then bridged (L2) or delivered to the bridge's own
address to be routed (the libvirt NAT case), and whether or not br_netfilter
hands bridged traffic to the IP hooks. A routed tap's packets pass the inet
family's prerouting hook with the tap as input interface. So the same chains
are rendered twice, into `bridge smtpguard` and `inet smtpguard`, both at
priority -300 (before conntrack: a rejected SYN never creates an entry). The
VM interface is matched by name (`iifname`), with wildcards from the policy's
interface patterns, so an interface the agent has not seen yet gets the
default class from its first packet.

Neither hook sees a VM on Open vSwitch (OVS's rx_handler switches its
frames: no bridge or inet hook runs on them) nor one on a macvtap (its guest's
packets leave through the device's transmit path). Those devices get the same
chains a third time, in `netdev smtpguard`, entered from one base chain per
device (`in_<ifname>` on its ingress, `out_<ifname>` on a macvtap's egress;
datapath/attachment.py): a netdev chain cannot name devices by wildcard, so
the agent adds a device's chain in the same step that attaches the classifier.
Bridged and routed taps stay in the bridge and inet tables, which also cover
a matching device the agent has not seen yet (by wildcard); per packet the
two placements measured alike (bench placement: within the rounds' noise). At egress the device is
`oifname`, not `iifname`: the egress tree is the same chains keyed by it,
prefixed `o_`, with its own verdict maps (their verdicts name its chains).
Netdev egress cannot reject, and runs before tc's egress hook: it marks the
SYNs it refuses, and the classifier there counts each attempt and drops it
(bpf/smtp_count.c). Netdev ingress rejects where the kernel has
nft_reject_netdev (6.18 here; not Debian 12's 6.1), else drops.

Only SYNs (no ACK/RST/FIN) to SMTP ports are judged; established connections
never meet a verdict, so a block or a ceiling never cuts a running session.
Per-VM data lives in sets and maps (nft_sets.py), never in one rule per VM
(a netdev device's base chain is one rule, the jump).
"""

from __future__ import annotations

from typing import Any

from smtpguard.enforce.desired import Capabilities, Desired
from smtpguard.policy.classes import Ceiling, VmClass
from smtpguard.policy.model import Policy

TABLE = "smtpguard"
FAMILIES = ("bridge", "inet", "netdev")
EGRESS = "o_"  # the netdev egress tree's chains and verdict maps
PRIORITY = -300
REASONS = ("port25", "limit", "throttle", "block")

IIF: dict[str, Any] = {"meta": {"key": "iifname"}}
OIF: dict[str, Any] = {"meta": {"key": "oifname"}}
RETURN: dict[str, Any] = {"return": None}


def _p(proto: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": fld}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _jump(target: str) -> dict[str, Any]:
    return {"jump": {"target": target}}


def goto(target: str) -> dict[str, Any]:
    """A verdict map's choice is final: a VM sent to its class's chain (or
    its block, throttle or relay) must not come back and meet the default
    class's rules as well."""
    return {"goto": {"target": target}}


def _seen_key(ip: str, dev: dict[str, Any]) -> dict[str, Any]:
    return {"concat": [dev, _p(ip, "saddr"), _p("tcp", "sport"), _p("tcp", "sequence")]}


def _count_key(dev: dict[str, Any]) -> dict[str, Any]:
    return {"concat": [dev, _p("tcp", "dport")]}


def class_chain(name: str) -> str:
    return f"class_{name}"


def throttle_chain(name: str) -> str:
    return f"throttle_{name}"


def nft_limit(ceiling: Ceiling) -> dict[str, Any]:
    """An nftables limit ('over'): integer rate per second/minute/hour/day/week."""
    units = (("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400), ("week", 604800))
    per_second = ceiling.rate.per_second
    for unit, seconds in units:
        n = per_second * seconds
        if abs(n - round(n)) < 1e-9 and round(n) >= 1:
            return {"limit": {"rate": round(n), "per": unit, "burst": ceiling.burst,
                              "inv": True}}
    return {"limit": {"rate": max(1, round(per_second * 604800)), "per": "week",
                      "burst": ceiling.burst, "inv": True}}


def iface_wildcards(policy: Policy) -> list[str]:
    """The interface patterns as nftables names: the prefix before the first
    wildcard or {vm}, plus '*' (a superset of the pattern); nested prefixes merged."""
    out: set[str] = set()
    for p in policy.interfaces.patterns:
        cut = min([i for i in (p.pattern.find(c) for c in "*?{") if i >= 0],
                  default=len(p.pattern))
        out.add(p.pattern[:cut] + "*" if cut < len(p.pattern) else p.pattern)
    pruned = [w for w in out if not any(
        o != w and o.endswith("*") and w.startswith(o[:-1]) for o in out)]
    return sorted(pruned)


def port25_blocked(c: VmClass, family: str) -> bool:
    """Redirect needs the IP layer's NAT: the bridge and netdev tables cannot
    send a connection elsewhere, so there it fails closed and blocks port 25."""
    return c.port25 == "block" or (c.port25 == "redirect" and family != "inet")


def _limited(c: VmClass, family: str) -> list[int]:
    on25 = c.port25 == "limit" or (c.port25 == "redirect" and family == "inet")
    return sorted({*c.limited_ports, *([25] if on25 else [])})


def _class_rules(name: str, c: VmClass, policy: Policy, throttled: bool,
                 family: str, dev: dict[str, Any] = IIF, pre: str = "") -> list[list[Any]]:
    rules: list[list[Any]] = []
    if policy.mode_of(name) == "audit":
        return rules  # counted and detected, never judged
    blocked25 = port25_blocked(c, family)
    if blocked25:
        rules.append([_match(_p("tcp", "dport"), 25), _jump(f"{pre}reject_port25")])
    elif c.port25 == "redirect":  # a family without a relay to send to fails closed
        have = {a.version for a in c.redirect_to}
        for version, proto in ((4, "ipv4"), (6, "ipv6")):
            if version not in have:
                rules.append([_match({"meta": {"key": "nfproto"}}, proto),
                              _match(_p("tcp", "dport"), 25), _jump(f"{pre}reject_port25")])
    ceiling: Ceiling | None
    if throttled:
        ports = sorted(p for p in policy.smtp_ports if not (p == 25 and blocked25))
        ceiling, limiter, reason = c.throttle, f"thr_{name}", "reject_throttle"
    else:
        ports, ceiling, limiter, reason = _limited(c, family), c.limit, f"lim_{name}", \
            "reject_limit"
    if ports and ceiling is not None:
        # A VM with several interfaces: one named limit for all of them (a
        # meter cannot be keyed by a map lookup); the others, one meter
        # element per interface, which is one per VM.
        rules.append([
            _match(_p("tcp", "dport"), {"set": ports}),
            {"limit": {"map": {"key": dev, "data": "@vm_thr" if throttled else "@vm_lim"}}},
            _jump(pre + reason),
        ])
        rules.append([_match(dev, "@vm_shared"), RETURN])
        rules.append([
            _match(_p("tcp", "dport"), {"set": ports}),
            {"set": {"op": "update", "elem": dev, "set": f"@{limiter}",
                     "stmt": [nft_limit(ceiling)]}},
            _jump(pre + reason),
        ])
    return rules


def _verdict(family: str, caps: Capabilities) -> list[dict[str, Any]]:
    ok = {"bridge": caps.reject_bridge, "inet": caps.reject_inet,
          "netdev": caps.reject_netdev}[family]
    return [{"reject": {"type": "tcp reset"}} if ok else {"drop": None}]


def _egress_verdict(mark: int) -> list[dict[str, Any]]:
    """At a macvtap's egress netfilter runs before tc: a refused SYN is
    marked and passed on for the classifier to count and drop (bpf/
    smtp_count.c, vm_tx_verdict); without a mark configured, dropped here
    (then counted only as a blocked attempt)."""
    if not mark:
        return [{"drop": None}]
    meta: dict[str, Any] = {"meta": {"key": "mark"}}
    return [{"mangle": {"key": meta, "value": {"|": [meta, mark]}}}, {"accept": None}]


def _reason_rules(reason: str, verdict: list[dict[str, Any]],
                  dev: dict[str, Any] = IIF) -> list[list[Any]]:
    """Reject (or drop), counting each distinct attempt once per (interface, port)."""
    rules = []
    for ip, seen in (("ip", "@seen4"), ("ip6", "@seen6")):
        rules.append([_match(_seen_key(ip, dev), seen), *verdict])  # a retransmission
    for ip, seen in (("ip", "@seen4"), ("ip6", "@seen6")):
        rules.append([
            {"set": {"op": "add", "elem": _seen_key(ip, dev), "set": seen}},
            {"set": {"op": "add", "elem": _count_key(dev), "set": f"@cnt_{reason}"}},
            *verdict,
        ])
    # Reached only when a set above was full: still enforced, counted per port
    # (an element of a set listed on its own: reading a named counter makes
    # libnftables fetch every set's elements), and enforced whatever happens.
    rules.append([{"set": {"op": "add", "elem": _p("tcp", "dport"), "set": "@overflow"}},
                  *verdict])
    rules.append(list(verdict))
    return rules


def entry(target: str) -> list[list[Any]]:
    """A base chain's one rule. Only a bare SYN (a new attempt) goes further:
    every other packet, an SMTP session's included, leaves at this first
    rule, on its cheapest test (the TCP flags byte; not TCP at all fails
    before that)."""
    return [[_match({"&": [_p("tcp", "flags"), ["fin", "syn", "rst", "ack"]]}, "syn"),
             _match(_p("tcp", "dport"), "@smtp_ports"), _jump(target)]]


def device_chains(desired: Desired) -> dict[str, tuple[str, str]]:
    """The netdev table's base chains: name -> (hook, device), one per
    device whose VM's packets only the device's own hooks see."""
    out = {}
    for ifname, hook in sorted(desired.hooks.items()):
        out[("in_" if hook == "ingress" else "out_") + ifname] = (hook, ifname)
    return out


def _tree(pol: Policy, family: str, verdict: list[dict[str, Any]], dev: dict[str, Any],
          pre: str) -> dict[str, list[list[Any]]]:
    """The chains a SYN to an SMTP port goes through, from `smtp` on."""
    out: dict[str, list[list[Any]]] = {
        f"{pre}smtp": [
            *_relay_rules(pol.datapath.trip_mark, pre),
            [{"vmap": {"key": dev, "data": f"@{pre}vm_state"}}],
            [{"vmap": {"key": dev, "data": f"@{pre}vm_class"}}],
            [_match(dev, "@vm_ifaces"), _jump(pre + class_chain(pol.default_class))],
        ],
        f"{pre}block": [[_jump(f"{pre}reject_block")]],
    }
    for name, c in sorted(pol.classes.items()):
        out[pre + class_chain(name)] = _class_rules(name, c, pol, False, family, dev, pre)
        out[pre + throttle_chain(name)] = _class_rules(name, c, pol, True, family, dev, pre)
    for reason in REASONS:
        out[f"{pre}reject_{reason}"] = _reason_rules(reason, verdict, dev)
    return out


def chains(desired: Desired, family: str, caps: Capabilities) -> dict[str, list[list[Any]]]:
    """chain name -> its rules, in order; base chains first."""
    pol = desired.policy
    verdict = _verdict(family, caps)
    if family == "netdev":
        out = {name: entry("smtp" if hook == "ingress" else f"{EGRESS}smtp")
               for name, (hook, _dev) in device_chains(desired).items()}
        out.update(_tree(pol, family, verdict, IIF, ""))
        out.update(_tree(pol, family, _egress_verdict(pol.datapath.trip_mark), OIF,
                         EGRESS))  # egress cannot reject
        return out
    out = {"prerouting": entry("smtp"), **_tree(pol, family, verdict, IIF, "")}
    if family == "inet" and redirecting(pol):
        out.update(_redirect_chains(pol))
    return out


def _relay_rules(mark: int, pre: str = "") -> list[list[Any]]:
    """The relays are always open; then a SYN the classifier marked (its VM
    is past a block threshold: datapath/trip.py) is blocked, before its VM's
    state or class is looked at. A marked SYN to a relay leaves unmarked."""
    meta: dict[str, Any] = {"meta": {"key": "mark"}}
    clear = [{"mangle": {"key": meta, "value": {"&": [meta, ~mark & 0xFFFFFFFF]}}}] \
        if mark else []
    rules = [[_match(_p("ip", "daddr"), "@relays4"), *clear, RETURN],
             [_match(_p("ip6", "daddr"), "@relays6"), *clear, RETURN]]
    if mark:
        rules.append([_match({"&": [meta, mark]}, mark), goto(f"{pre}block")])
    return rules


def redirecting(policy: Policy) -> list[str]:
    """The classes whose port-25 connections go to a relay (enforced ones)."""
    return sorted(n for n, c in policy.classes.items()
                  if c.port25 == "redirect" and policy.mode_of(n) != "audit")


def _redirect_chains(pol: Policy) -> dict[str, list[list[Any]]]:
    """DNAT at the nat hook (after the filter at -300 let the SYN through):
    known VMs by the vm_redirect map, not-yet-seen ones by the patterns when
    the default class redirects. Relays are left alone."""
    rules: list[list[Any]] = [
        [_match(_p("ip", "daddr"), "@relays4"), RETURN],
        [_match(_p("ip6", "daddr"), "@relays6"), RETURN],
        [{"vmap": {"key": IIF, "data": "@vm_redirect"}}],
    ]
    if pol.default_class in redirecting(pol):
        rules.append([_match(IIF, "@vm_ifaces"), _jump(f"redir_{pol.default_class}")])
    out = {"nat_prerouting": [[_match(_p("tcp", "dport"), 25), _jump("redirect")]],
           "redirect": rules}
    for name in redirecting(pol):
        to = []
        for addr in pol.classes[name].redirect_to:
            fam = "ip" if addr.version == 4 else "ip6"
            to.append([_match({"meta": {"key": "nfproto"}}, "ipv4" if fam == "ip" else "ipv6"),
                       {"dnat": {"family": fam, "addr": str(addr)}}])
        out[f"redir_{name}"] = to
    return out
