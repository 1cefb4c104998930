"""One iptables rule as smtpguard says it (pure: no kernel, no library),
its comment, and the bucket-renamed copies a full apply is made of.

Every rule carries a comment `smtpguard TAG DIGEST`: TAG says what it counts
(`block/25`, `limit/587`, ...; a timed action adds `@UNTIL`), DIGEST is a hash
of the rule's arguments, so a chain whose digests match what is wanted is
left untouched (its counters too).

A VM's chain is the same from one VM to the next but for its hashlimit
buckets' names, so iptables_render makes each class's chain once and every
VM's as copies with its own buckets (`Rule.rebucket`). A rule's digest text
and comment are worked out once per rule object and kept on it (hashing a
frozen dataclass, as a cache keyed by the rule would, costs more than most of
what is cached); what does not depend on the bucket's name (the shape
iptc_raw keeps templates under) is shared by a rule and its copies.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Literal

from smtpguard.enforce import ipset_state, render

Family = Literal["ipv4", "ipv6"]
COMMENT = "smtpguard"
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

    def _text(self, family: Family) -> str:
        """What the digest is of (memoized on the rule)."""
        memo: dict[Family, str] = self.__dict__.setdefault("memo:text", {})
        text = memo.get(family)
        if text is None:
            text = memo[family] = " ".join(self.args(family)) + (
                " [by-port]" if self.by_port else "")
        return text

    def comment(self, family: Family) -> str:
        memo: dict[Family, str] = self.__dict__.setdefault("memo:comment", {})
        got = memo.get(family)
        if got is None:
            digest = hashlib.sha1(self._text(family).encode()).hexdigest()[:10]
            tag = self.tag if self.until is None else f"{self.tag}@{self.until}"
            got = memo[family] = f"{COMMENT} {tag} {digest}"
        return got

    @property
    def alike(self) -> dict[str, Any]:
        """Memos shared with this rule's bucket-renamed copies: what does not
        depend on the bucket's name (iptc_raw's shape)."""
        memo: dict[str, Any] = self.__dict__.setdefault("memo:alike", {})
        return memo

    def rebucket(self, limit: Limit, family: Family) -> Rule:
        """This rule with another bucket (same rate, burst and mode). A copy
        made by hand: dataclasses.replace takes ~10 us and a full apply makes
        18,000 of them. Its digest text is this one's with the name swapped."""
        assert self.limit is not None
        new = object.__new__(Rule)
        d = new.__dict__
        d.update(self.__dict__)
        d["limit"] = limit
        d.pop("memo:comment", None)
        d["memo:text"] = {family: self._text(family).replace(
            f"--hashlimit-name {self.limit.name} ", f"--hashlimit-name {limit.name} ")}
        d["memo:alike"] = self.alike
        return new

    def retarget(self, target: str, family: Family) -> Rule:
        """This jump to another chain (as rebucket: a copy, its text swapped)."""
        new = object.__new__(Rule)
        d = new.__dict__
        d.update(self.__dict__)
        d["target"] = target
        d.pop("memo:comment", None)
        jump = "-g" if self.goto else "-j"
        d["memo:text"] = {family: self._text(family).replace(
            f"{jump} {self.target}", f"{jump} {target}")}
        d["memo:alike"] = self.alike
        return new


def datestop(until: int) -> str:
    """xt_time's --datestop for an action that ends at `until` (a whole
    second, rounded up): it matches up to and including its second, so the
    last second is the one before. Resolution 1 s, never early."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(until - 1))


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
