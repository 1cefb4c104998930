"""Render the desired state into iptables rules (pure: no kernel, no library).

The same semantics as the nftables tables, in what iptables can express:

    FORWARD, INPUT   -p tcp --syn -m multiport --dports <smtp ports> -j SMTPG   (first rule)
    SMTPG            relays -j RETURN; per known VM interface
                     `-i IF -g SMTPG-V-IF` and `--physdev-in IF -g SMTPG-V-IF`;
                     then the interface patterns (`veth+`) -g SMTPG-DEFAULT
    SMTPG-V-IF       that VM's block and throttle rules, each matching only
                     while the interface is in the state's ipset (`-m set
                     --match-set SMTPG-BLOCK4 src,src`; each twice: looked up
                     by input interface, and by bridge port), then its
                     class's rules
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

Every rule carries a comment `smtpguard TAG DIGEST`: TAG says what it counts
(`block/25`, `limit/587`, ...; a timed action adds `@UNTIL`), DIGEST is a hash
of the rule, so a chain whose digests match what is wanted is left untouched
(its counters too).
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from dataclasses import dataclass, replace
from typing import Literal

from smtpguard.enforce import ipset_state, render
from smtpguard.enforce.desired import Action, Desired
from smtpguard.policy.model import Ceiling, Policy, VmClass

Family = Literal["ipv4", "ipv6"]
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
PREFIX = "SMTPG"
DISPATCH = PREFIX
DEFAULT_CHAIN = f"{PREFIX}-DEFAULT"
VM_CHAIN = f"{PREFIX}-V-"
# Nothing jumps here: its rules only hold the counts of counting rules that
# were removed (a block lifted, a class changed), so per-VM counts never go back.
TALLY_CHAIN = f"{PREFIX}-TALLY"
NAT_CHAIN = f"{PREFIX}-NAT"  # in the nat table: port-25 redirects
NAT_HOOKS = ("PREROUTING",)
HOOKS = ("FORWARD", "INPUT")
COMMENT = "smtpguard"
UNKNOWN_IFACE = "*"  # what counters of not-yet-seen interfaces are reported under
MULTIPORT_MAX = 15  # ports one multiport match can hold
SIZES = {  # hashlimit tables: explicit sizes; a full table drops (never lets through)
    "vm": (16, 16),  # (buckets, max entries): one entry, the VM's own bucket
    "unknown": (4096, 65536),  # per source address of interfaces not seen yet
}
SRC_MASK = {"ipv4": 32, "ipv6": 64}  # an IPv6 VM gets one bucket per /64


@dataclass(frozen=True)
class Limit:
    """A hashlimit match rejecting what is over the ceiling."""

    name: str
    rate: str  # "20/min"
    burst: int
    per_source: bool = False  # keyed by source address (interfaces not seen yet)
    size: int = 16
    max: int = 16


@dataclass(frozen=True)
class Rule:
    tag: str  # what the rule is, for counting: "block/25", "limit/587", "vm", ...
    target: str  # REJECT, RETURN or a chain
    goto: bool = False
    iface: str | None = None
    physdev: str | None = None
    dst: str | None = None
    syn_ports: tuple[int, ...] = ()  # the hook's jump: SYNs to these ports
    dport: int | None = None
    until: int | None = None  # epoch seconds: matches only until then (xt_time)
    limit: Limit | None = None
    not_dnat: bool = False  # only connections not redirected by our DNAT
    state: str | None = None  # matches only while the interface is in this state's set
    by_port: bool = False  # the set is looked up by bridge port (see ipset_state)
    to: str | None = None  # DNAT's destination (the nat table's redirect)

    @property
    def reason(self) -> str | None:
        """The reason a REJECT counts under (port25, limit, throttle, block)."""
        head = self.tag.split("/")[0]
        return head if head in render.REASONS and self.target == "REJECT" else None

    def args(self, family: Family) -> list[str]:
        """The rule as iptables arguments, without chain and comment."""
        a: list[str] = []
        if self.iface:
            a += ["-i", self.iface]
        if self.dst:
            a += ["-d", self.dst]
        if self.syn_ports:
            a += ["-p", "tcp", "-m", "tcp", "--syn", "-m", "multiport", "--dports",
                  ",".join(map(str, self.syn_ports))]
        if self.dport is not None:
            a += ["-p", "tcp", "-m", "tcp", "--dport", str(self.dport)]
        if self.physdev:
            a += ["-m", "physdev", "--physdev-in", self.physdev]
        if self.not_dnat:
            a += ["-m", "conntrack", "!", "--ctstate", "DNAT"]
        if self.until is not None:
            a += ["-m", "time", "--datestop", datestop(self.until)]
        if self.state:
            a += ["-m", "set", "--match-set", ipset_state.set_name(self.state, family),
                  "src,src"]
        if self.limit:
            lim = self.limit
            a += ["-m", "hashlimit", "--hashlimit-above", lim.rate, "--hashlimit-burst",
                  str(lim.burst), "--hashlimit-name", lim.name]
            if lim.per_source:
                mask = SRC_MASK[family]
                a += ["--hashlimit-mode", "srcip", "--hashlimit-srcmask", str(mask)]
            a += ["--hashlimit-htable-size", str(lim.size), "--hashlimit-htable-max",
                  str(lim.max), "--hashlimit-htable-expire", str(render.LIMITER_IDLE * 1000)]
        a += ["-g" if self.goto else "-j", self.target]
        if self.target == "REJECT":
            a += ["--reject-with", "tcp-reset"]
        if self.to:
            a += ["--to-destination", self.to]
        return a

    def comment(self, family: Family) -> str:
        return _comment(self, family)


@functools.lru_cache(maxsize=1 << 17)  # a full apply asks for each rule's more than once
def _comment(rule: Rule, family: Family) -> str:
    text = " ".join(rule.args(family)) + (" [by-port]" if rule.by_port else "")
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    tag = rule.tag if rule.until is None else f"{rule.tag}@{rule.until}"
    return f"{COMMENT} {tag} {digest}"


def tally_rule(ifname: str, tag: str) -> Rule:
    """Where a removed counting rule's count goes (never evaluated)."""
    return Rule(f"tally:{ifname}:{tag}", "RETURN", iface=ifname)


def parse_tally(tag: str) -> tuple[str, str] | None:
    """(ifname, counting tag) from a tally rule's tag."""
    kind, _, rest = tag.partition(":")
    ifname, _, counted = rest.rpartition(":")
    return (ifname, counted) if kind == "tally" and ifname else None


def counted(tag: str) -> tuple[str, int] | None:
    """(reason, port) a counting tag counts under ("block/25" -> ("block", 25))."""
    reason, _, port = tag.partition("/")
    return (reason, int(port)) if reason in render.REASONS and port.isdigit() else None


def parse_comment(comment: str) -> tuple[str, int | None] | None:
    """(tag, until) from one of our comments; None for anyone else's."""
    parts = comment.split()
    if len(parts) != 3 or parts[0] != COMMENT:
        return None
    tag, _, until = parts[1].partition("@")
    return tag, int(until) if until.isdigit() else None


def datestop(until: int) -> str:
    """xt_time's --datestop for an action that ends at `until` (a whole
    second, rounded up): it matches up to and including its second, so the
    last second is the one before. Resolution 1 s, never early."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(until - 1))


def vm_chain(ifname: str) -> str:
    return f"{VM_CHAIN}{ifname}"


def hashlimit_rate(ceiling: Ceiling) -> str:
    """hashlimit takes an integer per second/minute/hour/day."""
    per_second = ceiling.rate.per_second
    for unit, seconds in (("sec", 1), ("min", 60), ("hour", 3600), ("day", 86400)):
        n = per_second * seconds
        if abs(n - round(n)) < 1e-9 and round(n) >= 1:
            return f"{round(n)}/{unit}"
    return f"{max(1, round(per_second * 86400))}/day"


def _limit(kind: str, owner: str, ceiling: Ceiling, per_source: bool) -> Limit:
    """Named by what it limits and how: a reload that keeps the ceiling keeps
    the bucket (same name), a changed ceiling starts a fresh one."""
    rate = hashlimit_rate(ceiling)
    key = f"{kind}|{owner}|{rate}|{ceiling.burst}|{per_source}"
    size, most = SIZES["unknown" if per_source else "vm"]
    return Limit(f"sg{hashlib.sha1(key.encode()).hexdigest()[:12]}", rate, ceiling.burst,
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


def _action_rules(owner: str, c: VmClass, policy: Policy, family: Family) -> list[Rule]:
    """A block and a throttle, each in force while the interface is in its
    set: every rule twice, looking the set up by the packet's input interface
    (routed taps) and by its bridge port (bridged VMs)."""
    ports = sorted(policy.smtp_ports)
    rules = [Rule(f"block/{p}", "REJECT", dport=p, state="block") for p in ports]
    blocked25 = blocks25(c, family)
    if blocked25:
        rules.append(Rule("port25/25", "REJECT", dport=25, state="throttle"))
    lim = _limit("throttle", owner, c.throttle, False)
    rules += [Rule(f"throttle/{p}", "REJECT", dport=p, limit=lim, state="throttle")
              for p in ports if not (p == 25 and blocked25)]
    # the class ceiling does not apply to a throttled VM
    rules.append(Rule("throttled", "RETURN", state="throttle"))
    return [v for r in rules for v in (r, replace(r, by_port=True))]


def vm_rules(ifname: str, cls: str, policy: Policy, family: Family,
             owner: str | None = None) -> list[Rule]:
    """owner: whose ceiling the hashlimits are (the VM's, for a VM with
    several interfaces: the same name is one bucket in the kernel)."""
    c = policy.classes[cls]
    audit = policy.mode_of(cls) == "audit"
    owner = owner or ifname
    head = [] if audit else _action_rules(owner, c, policy, family)
    return head + _class_rules(cls, policy, owner, False, family)


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
    for ifname, cls in vm_ifaces(desired).items():
        out[vm_chain(ifname)] = vm_rules(ifname, cls, pol, family,
                                         shared_owner(desired, ifname))
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
