"""Render the desired state into iptables rules (pure: no kernel, no library).

The same semantics as the nftables tables, in what iptables can express:

    FORWARD, INPUT   -p tcp --syn -m multiport --dports <smtp ports> -j SMTPG   (first rule)
    SMTPG            relays -j RETURN; per known VM interface
                     `-i IF -g SMTPG-V-IF` and `--physdev-in IF -g SMTPG-V-IF`;
                     then the interface patterns (`veth+`) -g SMTPG-DEFAULT
    SMTPG-V-IF       that VM's block rules, each matching only while the
                     interface is in the block ipset (`-m set --match-set
                     SMTPG-BLOCK4 src,src`; each twice: looked up by input
                     interface, and by bridge port), its class's port-25
                     block, `-g SMTPG-T-IF` while in the throttle set (twice
                     too), then its class's ceiling
    SMTPG-T-IF       that VM's throttle: the tighter ceiling, no lookups
    SMTPG-DEFAULT    the default class for interfaces the agent has not seen yet

iptables has no interface-keyed maps, so a VM's ceiling is a hashlimit of its
own (one bucket, shared by the VM's limited ports), and interfaces not seen yet
are limited per source address. The filter table's FORWARD hook sees routed
taps (`-i`) and bridged VMs when br_netfilter hands bridged IP traffic to
iptables (`--physdev-in`). Rejections are TCP resets, which FORWARD and INPUT
can always send; a refused client does not retransmit, so each rejected SYN is
one attempt and a rule's packet counter is the count.

The rules of a VM do not change when it is blocked, throttled or released:
only its elements in the SMTPG-BLOCK/SMTPG-THROTTLE sets do (ipset_state.py;
a timed action is an element timeout), so such a change never replaces the
table, and the counts of its rules stay on them.

Every rule carries a comment saying what it counts and a digest of the
rule (iptables_rule.py), so a chain whose digests match what is wanted is left
untouched (its counters too). A VM's chain is its class's, made once per
apply, with the VM's own hashlimit buckets written in (`chains`).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import replace

from smtpguard.enforce import ipset_state, render
from smtpguard.enforce.desired import Action, Desired
from smtpguard.enforce.iptables_rule import COMMENT as COMMENT  # re-exported: callers say R.Rule
from smtpguard.enforce.iptables_rule import SRC_MASK as SRC_MASK
from smtpguard.enforce.iptables_rule import Family as Family
from smtpguard.enforce.iptables_rule import Limit as Limit
from smtpguard.enforce.iptables_rule import Rule as Rule
from smtpguard.enforce.iptables_rule import counted as counted
from smtpguard.enforce.iptables_rule import datestop as datestop
from smtpguard.enforce.iptables_rule import parse_comment as parse_comment
from smtpguard.enforce.iptables_rule import parse_tally as parse_tally
from smtpguard.enforce.iptables_rule import tally_rule as tally_rule
from smtpguard.policy.classes import Ceiling, VmClass
from smtpguard.policy.model import Policy

FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
PREFIX = "SMTPG"
DISPATCH = PREFIX
DEFAULT_CHAIN = f"{PREFIX}-DEFAULT"
VM_CHAIN = f"{PREFIX}-V-"
THROTTLE_CHAIN = f"{PREFIX}-T-"  # a VM's throttle, reached while it is in the throttle set
PROTO_THROTTLE = f"{THROTTLE_CHAIN}\0"  # the throttle chain in a class's (see vm_chains)
# Nothing jumps here: its rules only hold the counts of counting rules that
# were removed (a block lifted, a class changed), so per-VM counts never go back.
TALLY_CHAIN = f"{PREFIX}-TALLY"
NAT_CHAIN = f"{PREFIX}-NAT"  # in the nat table: port-25 redirects
NAT_HOOKS = ("PREROUTING",)
HOOKS = ("FORWARD", "INPUT")
UNKNOWN_IFACE = "*"  # what counters of not-yet-seen interfaces are reported under
MULTIPORT_MAX = 15  # ports one multiport match can hold
SIZES = {  # hashlimit tables: explicit sizes; a full table drops (never lets through)
    "vm": (16, 16),  # (buckets, max entries): one entry, the VM's own bucket
    "unknown": (4096, 65536),  # per source address of interfaces not seen yet
}


def vm_chain(ifname: str) -> str:
    return f"{VM_CHAIN}{ifname}"


def throttle_chain(ifname: str) -> str:
    return f"{THROTTLE_CHAIN}{ifname}"


def owner_of(chain: str) -> str | None:
    """The interface whose counts a chain's rules hold (None: no one's)."""
    for prefix in (VM_CHAIN, THROTTLE_CHAIN):
        if chain.startswith(prefix):
            return chain[len(prefix):]
    return UNKNOWN_IFACE if chain == DEFAULT_CHAIN else None


def hashlimit_rate(ceiling: Ceiling) -> str:
    """hashlimit takes an integer per second/minute/hour/day."""
    per_second = ceiling.rate.per_second
    for unit, seconds in (("sec", 1), ("min", 60), ("hour", 3600), ("day", 86400)):
        n = per_second * seconds
        if abs(n - round(n)) < 1e-9 and round(n) >= 1:
            return f"{round(n)}/{unit}"
    return f"{max(1, round(per_second * 86400))}/day"


def _bucket(kind: str, owner: str, rate: str, burst: int, per_source: bool) -> str:
    """Named by what it limits and how: a reload that keeps the ceiling keeps
    the bucket (same name), a changed ceiling starts a fresh one."""
    key = f"{kind}|{owner}|{rate}|{burst}|{per_source}"
    return f"sg{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _limit(kind: str, owner: str, ceiling: Ceiling, per_source: bool) -> Limit:
    rate = hashlimit_rate(ceiling)
    size, most = SIZES["unknown" if per_source else "vm"]
    return Limit(_bucket(kind, owner, rate, ceiling.burst, per_source), rate, ceiling.burst,
                 per_source, size, most)


def default_limit(policy: Policy) -> Limit | None:
    """The per-source limiter of interfaces not seen yet (for its fill level)."""
    c = policy.classes[policy.default_class]
    return None if c.limit is None else _limit("limit", "*", c.limit, True)


def wildcards(policy: Policy) -> list[str]:
    """The interface patterns as iptables interface names (`veth*` -> `veth+`)."""
    return [w[:-1] + "+" if w.endswith("*") else w for w in render.iface_wildcards(policy)]


def redirect_to(c: VmClass, family: Family) -> str | None:
    """Where a redirecting class sends port 25 in this family (None: nowhere)."""
    version = 4 if family == "ipv4" else 6
    return next((str(a) for a in c.redirect_to if a.version == version), None) \
        if c.port25 == "redirect" else None


def blocks25(c: VmClass, family: Family) -> bool:
    """A redirect without a relay in this family fails closed."""
    return c.port25 == "block" or (c.port25 == "redirect" and not redirect_to(c, family))


def _class_rules(cls: str, policy: Policy, owner: str, per_source: bool,
                 family: Family) -> list[Rule]:
    rules: list[Rule] = []
    c = policy.classes[cls]
    if policy.mode_of(cls) == "audit":
        return rules  # counted and detected, never judged
    if blocks25(c, family):
        rules.append(Rule("port25/25", "REJECT", dport=25))
    on25 = c.port25 == "limit" or redirect_to(c, family) is not None
    limited = sorted({*c.limited_ports, *([25] if on25 else [])})
    if c.limit is not None:
        lim = _limit("limit", owner, c.limit, per_source)
        rules += [Rule(f"limit/{p}", "REJECT", dport=p, limit=lim) for p in limited]
    return rules


def _action_rules(owner: str, c: VmClass, policy: Policy, family: Family
                  ) -> tuple[list[Rule], list[Rule], list[Rule]]:
    """A block and a throttle, each in force while the interface is in its
    set: the block's rules and the jumps to the VM's throttle chain each
    twice, looking the set up by the packet's input interface (routed taps)
    and by its bridge port (bridged VMs); then the throttle chain's rules,
    which need no lookup. Port 25 of a class that blocks it has no throttle
    rule: the class's own block comes first. Returns (block, jumps, throttle)."""
    ports = sorted(policy.smtp_ports)
    blocked25 = blocks25(c, family)
    lim = _limit("throttle", owner, c.throttle, False)
    throttle = [Rule(f"throttle/{p}", "REJECT", dport=p, limit=lim)
                for p in ports if not (p == 25 and blocked25)]
    # goto: the throttle chain's end ends the judgement, so the class
    # ceiling does not apply to a throttled VM
    jump = Rule("throttled", throttle_chain(owner), goto=True, state="throttle")
    return ([v for p in ports for r in [Rule(f"block/{p}", "REJECT", dport=p, state="block")]
             for v in (r, replace(r, by_port=True))],
            [jump, replace(jump, by_port=True)], throttle)


PROTO_OWNER = "\0"  # whose buckets and chains a class's chains are first made with


def vm_chains(ifname: str, cls: str, policy: Policy, family: Family,
              owner: str | None = None,
              protos: dict[str, tuple[list[Rule], list[Rule]]] | None = None
              ) -> dict[str, list[Rule]]:
    """A VM's chains: its throttle chain (empty for an audit class: a class
    change hands its counts on like any rule's), then its own, which jumps
    there. owner: whose ceiling the hashlimits are (the VM's, for a VM with
    several interfaces: the same name is one bucket in the kernel). protos:
    the class chains made so far in this rendering, reused."""
    proto = None if protos is None else protos.get(cls)
    if proto is None:
        own = _class_rules(cls, policy, PROTO_OWNER, False, family)
        if policy.mode_of(cls) == "audit":
            proto = (own, [])
        else:  # block; the class's port 25 (whatever the state); throttle; ceiling
            block, jumps, throttle = _action_rules(PROTO_OWNER, policy.classes[cls], policy,
                                                   family)
            proto = (block + [r for r in own if not r.limit] + jumps +
                     [r for r in own if r.limit], throttle)
        if protos is not None:
            protos[cls] = proto
    owner = owner or ifname
    return {throttle_chain(ifname): _owned(proto[1], owner, ifname, family),
            vm_chain(ifname): _owned(proto[0], owner, ifname, family)}


def vm_rules(ifname: str, cls: str, policy: Policy, family: Family,
             owner: str | None = None) -> list[Rule]:
    """The rules of a VM's own chain (see vm_chains)."""
    return vm_chains(ifname, cls, policy, family, owner)[vm_chain(ifname)]


def _owned(proto: list[Rule], owner: str, ifname: str, family: Family) -> list[Rule]:
    """A class's chain with this owner's buckets and this interface's
    throttle chain: the rules with neither are the class's own objects, the
    others copies (Rule.rebucket, Rule.retarget)."""
    buckets: dict[str, Limit] = {}
    out: list[Rule] = []
    for r in proto:
        lim = r.limit
        if lim is None:
            out.append(r if r.target != PROTO_THROTTLE else
                       r.retarget(throttle_chain(ifname), family))
            continue
        mine = buckets.get(lim.name)
        if mine is None:
            kind = r.tag.partition("/")[0]  # throttle/465 -> the throttle's bucket
            mine = buckets[lim.name] = Limit(
                _bucket(kind, owner, lim.rate, lim.burst, lim.per_source), lim.rate,
                lim.burst, lim.per_source, lim.size, lim.max)
        out.append(r.rebucket(mine, family))
    return out


def shared_owner(desired: Desired, ifname: str) -> str | None:
    """A VM with several interfaces owns their ceilings (`vm:<id>`)."""
    vm = desired.groups.get(ifname)
    return None if vm is None else f"vm:{vm}"


def vm_ifaces(desired: Desired) -> dict[str, str]:
    """Interfaces with a chain of their own -> class: every known VM, and any
    interface with a block or throttle (as nftables keeps it for any name)."""
    pol = desired.policy
    out = dict(desired.classes)
    for ifname in desired.actions:
        out.setdefault(ifname, pol.default_class)
    return {n: (c if c in pol.classes else pol.default_class) for n, c in sorted(out.items())}


def relays(policy: Policy, family: Family) -> list[str]:
    version = 4 if family == "ipv4" else 6
    return [str(r) for r in policy.relays if r.version == version]


def dispatch_rules(desired: Desired, family: Family) -> list[Rule]:
    pol = desired.policy
    # A connection our DNAT sent to a relay still meets its VM's ceiling.
    rules = [Rule("relay", "RETURN", dst=r, not_dnat=bool(render.redirecting(pol)))
             for r in relays(pol, family)]
    for ifname in vm_ifaces(desired):
        rules.append(Rule("vm", vm_chain(ifname), goto=True, iface=ifname))
        rules.append(Rule("vm", vm_chain(ifname), goto=True, physdev=ifname))
    for w in wildcards(pol):
        rules.append(Rule("unknown", DEFAULT_CHAIN, goto=True, iface=w))
        rules.append(Rule("unknown", DEFAULT_CHAIN, goto=True, physdev=w))
    return rules


def hook_rules(policy: Policy) -> list[Rule]:
    """The jump each hook starts with: SMTP SYNs only, everything else passes by."""
    ports = sorted(policy.smtp_ports)
    return [Rule("jump", DISPATCH, syn_ports=tuple(ports[i:i + MULTIPORT_MAX]))
            for i in range(0, len(ports), MULTIPORT_MAX)]


def chains(desired: Desired, family: Family, now: float | None = None
           ) -> dict[str, list[Rule]]:
    """Our chains (name -> rules in order), dispatch first."""
    now = time.time() if now is None else now
    pol = desired.policy
    out = {DISPATCH: dispatch_rules(desired, family),
           DEFAULT_CHAIN: _class_rules(pol.default_class, pol, "*", True, family)}
    protos: dict[str, tuple[list[Rule], list[Rule]]] = {}
    for ifname, cls in vm_ifaces(desired).items():
        out.update(vm_chains(ifname, cls, pol, family, shared_owner(desired, ifname), protos))
    return out


def set_state(desired: Desired, now: float | None = None) -> ipset_state.State:
    """What our sets should hold: the actions in force of interfaces with a
    chain whose class judges (an audit class has no action rules)."""
    now = time.time() if now is None else now
    pol = desired.policy
    out: ipset_state.State = {}
    for ifname, cls in vm_ifaces(desired).items():
        action = desired.actions.get(ifname)
        if action is None or pol.mode_of(cls) == "audit":
            continue
        until = ipset_state.until_of(action)
        if until is None or until > now:
            out[ifname] = (action.kind, until)
    return out


def nat_rules(desired: Desired, family: Family) -> list[Rule]:
    """SMTPG-NAT, in the nat table's PREROUTING: each known VM of a
    redirecting class to its relay (bridged ones by --physdev-in, which
    br_netfilter provides), the others left alone, then the patterns when the
    default class redirects. Empty when no class redirects."""
    pol = desired.policy
    if not render.redirecting(pol):
        return []
    rules = [Rule("relay", "RETURN", dst=r) for r in relays(pol, family)]
    default_to = redirect_to(pol.classes[pol.default_class], family) \
        if pol.default_class in render.redirecting(pol) else None
    for ifname, cls in vm_ifaces(desired).items():
        to = redirect_to(pol.classes[cls], family) if cls in render.redirecting(pol) else None
        if to is None and default_to is None:
            continue  # nothing below would catch it
        target = "DNAT" if to else "RETURN"
        rules.append(Rule("redirect" if to else "vm", target, iface=ifname, to=to))
        rules.append(Rule("redirect" if to else "vm", target, physdev=ifname, to=to))
    if default_to:
        for w in wildcards(pol):
            rules.append(Rule("redirect", "DNAT", iface=w, to=default_to))
            rules.append(Rule("redirect", "DNAT", physdev=w, to=default_to))
    return rules


def nat_hook_rules(policy: Policy) -> list[Rule]:
    """PREROUTING's first rule in the nat table (only new connections meet it)."""
    return [Rule("jump", NAT_CHAIN, syn_ports=(25,))] if render.redirecting(policy) else []


def restore_text(desired: Desired, family: Family, now: float | None = None) -> str:
    """What apply() builds, as iptables-restore input (for --dry-run)."""
    want = chains(desired, family, now)
    inet = "inet" if family == "ipv4" else "inet6"
    lines = [f"# ipset restore -exist, {family} (before the rules that refer to the sets)"]
    lines += [f"#   create {ipset_state.set_name(k, family)} hash:net,iface family {inet} "
              f"timeout 0 comment maxelem {ipset_state.MAXELEM}" for k in ipset_state.KINDS]
    for ifname, (kind, until) in sorted(set_state(desired, now).items()):
        left = 0 if until is None else max(1, math.ceil(until - (time.time() if now is None
                                                                 else now)))
        for dev in (ifname, f"physdev:{ifname}"):
            lines.append(f"#   add {ipset_state.set_name(kind, family)} "
                         f"{ipset_state.ANY[family]},{dev} timeout {left} "
                         f"comment \"{'' if until is None else until}\"")
    lines += [f"# {family}: ip{'6' if family == 'ipv6' else ''}tables-legacy-restore "
              "--noflush", "*filter"]
    lines += [f":{name} - [0:0]" for name in want]
    for hook in HOOKS:
        lines += [_line(hook, r, family, insert=True) for r in reversed(hook_rules(
            desired.policy))]
    for name, rules in want.items():
        for r in rules:
            if r.by_port:  # xt_set can, iptables cannot say it
                lines.append("# the next rule looks its set up by bridge port "
                             "(xt_set flag IPSET_FLAG_PHYSDEV)")
            lines.append(_line(name, r, family))
    lines.append("COMMIT")
    if render.redirecting(desired.policy):
        lines += ["*nat", f":{NAT_CHAIN} - [0:0]"]
        lines += [_line(hook, r, family, insert=True) for hook in NAT_HOOKS
                  for r in nat_hook_rules(desired.policy)]
        lines += [_line(NAT_CHAIN, r, family) for r in nat_rules(desired, family)]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _line(chain: str, rule: Rule, family: Family, insert: bool = False) -> str:
    return " ".join([f"-{'I' if insert else 'A'}", chain, *rule.args(family),
                     "-m", "comment", "--comment", f'"{rule.comment(family)}"'])


def actions_of(state: ipset_state.State) -> dict[str, Action]:
    """Blocks and throttles in force, from our sets' (kind, until) per interface."""
    return {n: Action(kind, None if until is None else float(until))  # type: ignore[arg-type]
            for n, (kind, until) in state.items()}
