"""The nftables sets and maps: their definitions (sized, with their
timeouts) and the elements the desired state puts in them. Per-VM data lives
here, never in one rule per VM (nft_chains.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from smtpguard.enforce.desired import Action, Desired
from smtpguard.enforce.nft_chains import (
    EGRESS,
    REASONS,
    RETURN,
    class_chain,
    goto,
    iface_wildcards,
    nft_limit,
    redirecting,
    throttle_chain,
)
from smtpguard.policy.classes import Ceiling

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
        elems.append([key, goto(target)])
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
        "vm_class": [[ifname, goto(class_chain(cls))] for ifname, cls in vm_class],
        "vm_state": state_elements(desired.actions, desired.classes, pol.default_class, now),
        f"{EGRESS}vm_class": [[ifname, goto(EGRESS + class_chain(cls))]
                              for ifname, cls in vm_class],
        f"{EGRESS}vm_state": state_elements(desired.actions, desired.classes,
                                            pol.default_class, now, EGRESS),
        "vm_redirect": [[ifname, goto(f"redir_{cls}") if cls in redirects else RETURN]
                        for ifname, cls in sorted(desired.classes.items())],
        "vm_shared": sorted(desired.groups),
        "vm_lim": [[i, _limit_name(vm, k, c)] for i, vm, _cls, k, c in _shared(desired)
                   if k == "lim"],
        "vm_thr": [[i, _limit_name(vm, k, c)] for i, vm, _cls, k, c in _shared(desired)
                   if k == "thr"],
    }


def same_set(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether an existing set can be kept as it is (its definition matches)."""
    def norm(d: dict[str, Any]) -> tuple[Any, ...]:
        flags = sorted(f for f in d.get("flags", []) if f != "dynamic")
        return (d.get("type"), d.get("map"), tuple(flags), d.get("timeout"), d.get("size"),
                bool(d.get("stmt")))
    return norm(have) == norm(want)
