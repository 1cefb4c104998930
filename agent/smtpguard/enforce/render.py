"""Render the desired state into nftables JSON commands (libnftables' JSON API).

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
Per-VM data lives in sets and maps, never in one rule per VM (a netdev
device's base chain is one rule, the jump).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from smtpguard.enforce.desired import Action, Capabilities, Desired
from smtpguard.policy.model import Ceiling, Policy, VmClass

TABLE = "smtpguard"
FAMILIES = ("bridge", "inet", "netdev")
EGRESS = "o_"  # the netdev egress tree's chains and verdict maps
PRIORITY = -300
REASONS = ("port25", "limit", "throttle", "block")
# Explicit sizes: an unsized dynamic set stops matching at 65,535. The kernel
# allocates each set's hash table for its size up front (8 bytes a slot, 4/3
# of it: 1 MB for 65,536) and zeroes it when the set is made: the 26 sized
# sets of the two tables took 30 MB (17 MB since), and a full apply's kernel
# time swung from 5 to 45 ms with the allocator. So none is bigger than what
# can fill it.
SIZES = {
    "limiter": 16384,  # one element per VM interface (idle 1 h: gone): 4x the classifier's
    "seen": 131072,  # rejected attempts remembered to tell retransmissions apart
    "count": 32768,  # one element per (interface, port): as many as smtp_stats holds
    "overflow": 1024,  # one per SMTP port: never full
}
LIMITER_IDLE = 3600  # a limiter idle this long is forgotten (it is full again anyway)
SEEN_FOR = 130  # Linux gives up on a SYN after ~127 s (tcp_syn_retries = 6)

IIF: dict[str, Any] = {"meta": {"key": "iifname"}}
OIF: dict[str, Any] = {"meta": {"key": "oifname"}}
RETURN: dict[str, Any] = {"return": None}


def _p(proto: str, fld: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": fld}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _jump(target: str) -> dict[str, Any]:
    return {"jump": {"target": target}}


def _goto(target: str) -> dict[str, Any]:
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


def shared_limits(desired: Desired) -> dict[str, dict[str, Any]]:
    """Named limit objects, one per VM with several interfaces and ceiling
    (its class's limit, its throttle): name -> the limit's body."""
    out: dict[str, dict[str, Any]] = {}
    for _ifname, vm, _cls, kind, ceiling in _shared(desired):
        out[_limit_name(vm, kind, ceiling)] = nft_limit(ceiling)["limit"]
    return out


def _shared(desired: Desired) -> list[tuple[str, str, str, str, Ceiling]]:
    pol = desired.policy
    rows = []
    for ifname, vm in sorted(desired.groups.items()):
        cls = desired.classes.get(ifname, pol.default_class)
        c = pol.classes.get(cls)
        if c is None:
            continue
        if c.limit is not None:
            rows.append((ifname, vm, cls, "lim", c.limit))
        rows.append((ifname, vm, cls, "thr", c.throttle))
    return rows


def _limit_name(vm: str, kind: str, ceiling: Ceiling) -> str:
    """Stable while the VM and its ceiling are: `add` keeps an existing
    object's state (and its old rate), so a new ceiling is a new name."""
    import hashlib

    h = hashlib.sha256(f"{vm}\0{ceiling.rate.per_second!r}\0{ceiling.burst}".encode())
    return f"vm{kind}_{h.hexdigest()[:16]}"


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


def _entry(target: str) -> list[list[Any]]:
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
        out = {name: _entry("smtp" if hook == "ingress" else f"{EGRESS}smtp")
               for name, (hook, _dev) in device_chains(desired).items()}
        out.update(_tree(pol, family, verdict, IIF, ""))
        out.update(_tree(pol, family, _egress_verdict(pol.datapath.trip_mark), OIF,
                         EGRESS))  # egress cannot reject
        return out
    out = {"prerouting": _entry("smtp"), **_tree(pol, family, verdict, IIF, "")}
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
        rules.append([_match({"&": [meta, mark]}, mark), _goto(f"{pre}block")])
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


def sets(desired: Desired, family: str = "inet") -> dict[str, dict[str, Any]]:
    """Set and map definitions (name -> JSON body without family/table/name)."""
    out: dict[str, dict[str, Any]] = {
        "smtp_ports": {"type": "inet_service"},
        "relays4": {"type": "ipv4_addr", "flags": ["interval"]},
        "relays6": {"type": "ipv6_addr", "flags": ["interval"]},
        "vm_ifaces": {"type": "ifname", "flags": ["interval"]},
        "vm_class": {"type": "ifname", "map": "verdict"},
        "vm_state": {"type": "ifname", "map": "verdict", "flags": ["timeout"]},
        "vm_shared": {"type": "ifname"},
        "vm_lim": {"type": "ifname", "map": "limit"},
        "vm_thr": {"type": "ifname", "map": "limit"},
    }
    if family == "inet" and redirecting(desired.policy):
        out["vm_redirect"] = {"type": "ifname", "map": "verdict"}
    if family == "netdev":
        out[f"{EGRESS}vm_class"] = {"type": "ifname", "map": "verdict"}
        out[f"{EGRESS}vm_state"] = {"type": "ifname", "map": "verdict", "flags": ["timeout"]}
    for name in sorted(desired.policy.classes):
        for prefix in ("lim", "thr"):
            out[f"{prefix}_{name}"] = {"type": "ifname", "flags": ["timeout"],
                                       "timeout": LIMITER_IDLE, "size": SIZES["limiter"]}
    for reason in REASONS:
        # counts.py: the hot counters, and those of idle interfaces retired
        for name in (f"cnt_{reason}", f"old_{reason}"):
            out[name] = {"type": ["ifname", "inet_service"], "size": SIZES["count"],
                         "stmt": [{"counter": None}]}
    out["overflow"] = {"type": "inet_service", "size": SIZES["overflow"],
                       "stmt": [{"counter": None}]}
    return out


# Sets whose key libnftables 1.0.x cannot declare in JSON (a typeof over
# tcp sequence); created once, by text, before the first transaction.
TYPEOF_SETS = {
    "seen4": f"typeof iifname . ip saddr . tcp sport . tcp sequence; size {SIZES['seen']}; "
             f"flags timeout; timeout {SEEN_FOR}s;",
    "seen6": f"typeof iifname . ip6 saddr . tcp sport . tcp sequence; size {SIZES['seen']}; "
             f"flags timeout; timeout {SEEN_FOR}s;",
}
DATA_SETS = ("smtp_ports", "relays4", "relays6", "vm_ifaces", "vm_class", "vm_state",
             "vm_redirect", "vm_shared", "vm_lim", "vm_thr", f"{EGRESS}vm_class",
             f"{EGRESS}vm_state")
CLASS_SETS = ("vm_class", "vm_redirect", "vm_shared", "vm_lim", "vm_thr", f"{EGRESS}vm_class")
STATE_MAPS = {"bridge": ("vm_state",), "inet": ("vm_state",),
              "netdev": ("vm_state", f"{EGRESS}vm_state")}
BASE_CHAINS = {"prerouting": ("filter", PRIORITY), "nat_prerouting": ("nat", -100)}


def _prefix(net: Any) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def state_elements(actions: Mapping[str, Action], classes: Mapping[str, str],
                   default_class: str, now: float | None = None, pre: str = "") -> list[Any]:
    """vm_state elements: a block goes to `block`, a throttle to its class's
    throttle chain (which holds the class's port-25 rule too); timed ones
    carry their remaining time (rounded up). pre: the egress tree's prefix
    for `o_vm_state`."""
    now = time.time() if now is None else now
    elems = []
    for ifname, action in sorted(actions.items()):
        cls = classes.get(ifname, default_class)
        target = pre + ("block" if action.kind == "block" else throttle_chain(cls))
        left = action.remaining(now)
        if left is not None and left <= 0:
            continue
        key: Any = ifname if left is None else {"elem": {"val": ifname,
                                                          "timeout": max(1, math.ceil(left))}}
        elems.append([key, _goto(target)])
    return elems


def elements(desired: Desired, now: float | None = None) -> dict[str, list[Any]]:
    pol = desired.policy
    redirects = set(redirecting(pol))
    vm_class = [[ifname, cls] for ifname, cls in sorted(desired.classes.items())
                if cls != pol.default_class]
    return {
        "smtp_ports": sorted(pol.smtp_ports),
        "relays4": [_prefix(r) for r in pol.relays if r.version == 4],
        "relays6": [_prefix(r) for r in pol.relays if r.version == 6],
        "vm_ifaces": iface_wildcards(pol),
        "vm_class": [[ifname, _goto(class_chain(cls))] for ifname, cls in vm_class],
        "vm_state": state_elements(desired.actions, desired.classes, pol.default_class, now),
        f"{EGRESS}vm_class": [[ifname, _goto(EGRESS + class_chain(cls))]
                              for ifname, cls in vm_class],
        f"{EGRESS}vm_state": state_elements(desired.actions, desired.classes,
                                            pol.default_class, now, EGRESS),
        "vm_redirect": [[ifname, _goto(f"redir_{cls}") if cls in redirects else RETURN]
                        for ifname, cls in sorted(desired.classes.items())],
        "vm_shared": sorted(desired.groups),
        "vm_lim": [[i, _limit_name(vm, k, c)] for i, vm, _cls, k, c in _shared(desired)
                   if k == "lim"],
        "vm_thr": [[i, _limit_name(vm, k, c)] for i, vm, _cls, k, c in _shared(desired)
                   if k == "thr"],
    }


def _obj(family: str, **body: Any) -> dict[str, Any]:
    return {"family": family, "table": TABLE, **body}


def element_commands(family: str, desired: Desired, names: Iterable[str],
                     now: float | None = None) -> list[dict[str, Any]]:
    """Replace the elements of data sets: flush, then add (one transaction)."""
    elems = elements(desired, now)
    have = sets(desired, family)
    cmds: list[dict[str, Any]] = []
    if {"vm_lim", "vm_thr"} & set(names):
        # `add` keeps an object that exists (and its bucket).
        cmds += [{"add": {"limit": _obj(family, name=n, **body)}}
                 for n, body in sorted(shared_limits(desired).items())]
    for name in names:
        if name not in have:
            continue  # vm_redirect without a redirecting class
        cmds.append({"flush": {"set" if "map" not in have[name] else "map":
                               _obj(family, name=name)}})
        if elems[name]:
            cmds.append({"add": {"element": _obj(family, name=name, elem=elems[name])}})
    return cmds


def table_commands(family: str, desired: Desired, caps: Capabilities,
                   observed: dict[str, Any] | None, now: float | None = None
                   ) -> list[dict[str, Any]]:
    """Bring one family's table to the desired state, keeping what it can:
    the limiter, seen and counter sets survive (their state and counters),
    rules and data elements are replaced, anything else of ours is pruned."""
    observed = observed or {"sets": {}, "chains": set()}
    wanted_chains = chains(desired, family, caps)
    wanted_sets = sets(desired, family)
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": family, "name": TABLE}}}]
    for name in observed["chains"]:
        cmds.append({"flush": {"chain": _obj(family, name=name)}})
    for name, body in wanted_sets.items():
        have = observed["sets"].get(name)
        kind = "map" if "map" in body else "set"
        if have is not None and same_set(have, body):
            continue  # kept with its elements (re-adding would clash on flags)
        if have is not None:
            cmds.append({"delete": {kind: _obj(family, name=name)}})
        cmds.append({"add": {kind: _obj(family, name=name, **body)}})
    devices = device_chains(desired) if family == "netdev" else {}
    for name in wanted_chains:
        cmds.append({"add": {"chain": chain_spec(family, name, devices)}})
    for name in sorted(observed["chains"] - set(wanted_chains)):
        cmds.append({"delete": {"chain": _obj(family, name=name)}})
    for name, have in sorted(observed["sets"].items()):
        if name not in wanted_sets and name not in TYPEOF_SETS:
            kind = "map" if "map" in have else "set"
            cmds.append({"delete": {kind: _obj(family, name=name)}})
    cmds += element_commands(family, desired, DATA_SETS, now)
    wanted_limits = shared_limits(desired)
    for name in sorted(observed.get("limits", set()) - set(wanted_limits)):
        cmds.append({"delete": {"limit": _obj(family, name=name)}})  # no element refers to it
    for name, rules in wanted_chains.items():
        for expr in rules:
            cmds.append({"add": {"rule": _obj(family, chain=name, expr=expr)}})
    return cmds


def chain_spec(family: str, name: str, devices: Mapping[str, tuple[str, str]]
               ) -> dict[str, Any]:
    """A chain's JSON body: a base chain's hook, device and priority too."""
    chain: dict[str, Any] = _obj(family, name=name)
    if family != "netdev" and name in BASE_CHAINS:
        kind, prio = BASE_CHAINS[name]
        chain.update(type=kind, hook="prerouting", prio=prio, policy="accept")
    elif name in devices:
        hook, dev = devices[name]
        chain.update(type="filter", hook=hook, dev=dev, prio=PRIORITY, policy="accept")
    return chain


def device_commands(desired: Desired, have: Iterable[str]) -> list[dict[str, Any]]:
    """Bring the netdev table's device chains to desired.hooks: those gone
    deleted (have: the device chains there now), each wanted one made (or
    kept) with its one rule."""
    wanted = device_chains(desired)
    cmds: list[dict[str, Any]] = [
        {"delete": {"chain": _obj("netdev", name=n)}} for n in sorted(set(have) - set(wanted))]
    for name, (hook, _dev) in wanted.items():
        cmds.append({"add": {"chain": chain_spec("netdev", name, wanted)}})
        cmds.append({"flush": {"chain": _obj("netdev", name=name)}})
        for expr in _entry("smtp" if hook == "ingress" else f"{EGRESS}smtp"):
            cmds.append({"add": {"rule": _obj("netdev", chain=name, expr=expr)}})
    return cmds


def is_device_chain(name: str) -> bool:
    return name.startswith(("in_", "out_"))


def same_set(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether an existing set can be kept as it is (its definition matches)."""
    def norm(d: dict[str, Any]) -> tuple[Any, ...]:
        flags = sorted(f for f in d.get("flags", []) if f != "dynamic")
        return (d.get("type"), d.get("map"), tuple(flags), d.get("timeout"), d.get("size"),
                bool(d.get("stmt")))
    return norm(have) == norm(want)
