"""Rules as the kernel and libiptc hold them: raw entries (struct
ipt_entry/ip6t_entry, xt_entry_match headers and data, the target).

python-iptables builds a rule in ~0.2 ms (48,000 rules at 1,000 VMs), so
iptc_table builds the first of each shape with it and makes the others as
copies with what differs from one VM to the next written in (interface,
jump, hashlimit name, comment: each a fixed-size field at an offset found
once per template), and a rule object in many chains (a class's rules
without a bucket) is made once. Rules are bytes, handed to libiptc as they
are. Reading walks the
entries the same way, for the comments and for what no rule's text shows:
a set match's bridge-port lookup (xt_set's IPSET_FLAG_PHYSDEV, which no
iptables option sets).
"""

from __future__ import annotations

import ctypes
from dataclasses import replace
from typing import Any

from smtpguard.enforce import ipset_state
from smtpguard.enforce import iptables_render as R
from smtpguard.errors import EnforcerError

IFACE_AT = {"ipv4": 16, "ipv6": 64}  # ipt_ip.iniface, ip6t_ip6.iniface
TARGET_OFFSET_AT = {"ipv4": 88, "ipv6": 140}  # ipt_entry/ip6t_entry.target_offset
JUMPS = (R.VM_CHAIN, R.THROTTLE_CHAIN)  # chains a template's jump is written in for


def shape(spec: R.Rule) -> R.Rule | None:
    """What a template is kept under: the rule with what differs from one VM
    to the next blanked (each a fixed-size field, written into a copy by
    Template.fill); None for what is not worth one (tallies, wildcards).
    Memoized on the rule and shared with its bucket-renamed copies."""
    memo = spec.alike
    if "shape" not in memo:
        memo["shape"] = _shape(spec)
    got: R.Rule | None = memo["shape"]
    return got


_SHAPES: dict[tuple[Any, ...], R.Rule] = {}  # by what is left of a rule: the dispatch's
# rules are new objects in every rendering, and dataclasses.replace costs ~10 us


def _shape(spec: R.Rule) -> R.Rule | None:
    if spec.tag.startswith("tally:"):
        return None
    iface, physdev, target, lim = spec.iface, spec.physdev, spec.target, spec.limit
    for name in (iface, physdev):
        if name and (name.endswith("+") or len(name) >= 16):
            return None
    if lim is not None and len(lim.name) >= 16:
        return None
    if target in (R.vm_chain(iface or ""), R.vm_chain(physdev or "")):
        target = R.VM_CHAIN  # the dispatch's jump to a VM's chain
    elif target.startswith(R.THROTTLE_CHAIN):
        target = R.THROTTLE_CHAIN  # a VM's jump to its throttle chain
    key = (spec.tag, target, spec.goto, iface and len(iface), physdev and len(physdev),
           spec.dst, spec.syn_ports, spec.dport, spec.until, spec.not_dnat, spec.state,
           spec.by_port, spec.to,
           lim and (lim.rate, lim.burst, lim.per_source, lim.size, lim.max))
    got = _SHAPES.get(key)
    if got is None:
        blank: dict[str, Any] = {"target": target}
        if iface:  # masks differ by length
            blank["iface"] = str(len(iface))
        if physdev:
            blank["physdev"] = str(len(physdev))
        if lim:
            blank["limit"] = replace(lim, name="")
        if len(_SHAPES) > 4096:
            _SHAPES.clear()
        got = _SHAPES[key] = replace(spec, **blank)
    return got


def _put(raw: bytearray, at: int, size: int, text: str) -> None:
    data = text.encode()
    if len(data) >= size:
        raise EnforcerError(f"{text!r} does not fit {size} bytes")
    raw[at:at + size] = data + b"\0" * (size - len(data))


class Template:
    """The first rule of a shape as python-iptables built it, and where in
    it what differs from one rule of the shape to the next sits: struct
    ipt_entry/ip6t_entry (the input interface), then xt_entry_match headers
    and data (physdev, hashlimit and comment each start with their string),
    then the target (a jump names its chain)."""

    def __init__(self, raw: bytes, family: R.Family, entry: Any) -> None:
        self.raw = raw
        self.family = family
        self.target_at = int.from_bytes(
            raw[TARGET_OFFSET_AT[family]:TARGET_OFFSET_AT[family] + 2], "little")
        self.data_at: dict[bytes, int] = {}  # match name -> where its data starts
        at = ctypes.sizeof(entry)
        while at + MATCH_HEAD <= self.target_at:
            size = int.from_bytes(raw[at:at + 2], "little")
            self.data_at.setdefault(raw[at + 2:at + 31].split(b"\0")[0], at + MATCH_HEAD)
            at += max(size, MATCH_HEAD)

    def fill(self, spec: R.Rule) -> bytes:
        """This rule: the template with its interface, jump, bucket and comment."""
        raw = bytearray(self.raw)
        if spec.iface:
            _put(raw, IFACE_AT[self.family], 16, spec.iface)
        at = self.data_at.get(b"physdev")
        if at is not None and spec.physdev:
            _put(raw, at, 16, spec.physdev)
        at = self.data_at.get(b"hashlimit")
        if at is not None and spec.limit:
            _put(raw, at, 16, spec.limit.name)
        at = self.data_at.get(b"comment")
        if at is not None:
            _put(raw, at, 256, spec.comment(self.family))
        if spec.target.startswith(JUMPS):
            _put(raw, self.target_at + 2, 29, spec.target)
        return bytes(raw)


def per_vm(spec: R.Rule) -> bool:
    """Whether a rule's bytes hold anything of one VM's (else one rule
    object's bytes serve every chain it is in)."""
    return bool(spec.iface or spec.physdev or spec.limit or spec.target.startswith(JUMPS))


# struct xt_set_info_match_v3/v4 (linux/netfilter/xt_set.h): after the
# xt_entry_match header (32 bytes), match_set (4, padded to 8), packets and
# bytes (16 each), then the u32 flags the kernel passes to the set as its
# command flags.
MATCH_HEAD = 32  # XT_ALIGN(sizeof(struct xt_entry_match))
SET_MATCH_FLAGS = MATCH_HEAD + 40


def by_bridge_port(match: Any) -> None:
    """Make a set match look hash:net,iface up by the packet's bridge port
    (physdev:IF elements) instead of its input interface: the kernel's
    IPSET_FLAG_PHYSDEV, which xt_set honours and no iptables option sets.
    iptables-save does not show it (the rule's comment digest does)."""
    buf = match.match_buf
    if buf[31] not in (3, 4):  # the revision: this layout is theirs
        raise EnforcerError(f"the kernel's set match is revision {buf[31]}, not 3 or 4")
    flags = int.from_bytes(bytes(buf[SET_MATCH_FLAGS:SET_MATCH_FLAGS + 4]), "little")
    flags |= ipset_state.FLAG_PHYSDEV
    buf[SET_MATCH_FLAGS:SET_MATCH_FLAGS + 4] = list(flags.to_bytes(4, "little"))


def entries(table: Any, chain: str) -> list[tuple[str, int, int]]:
    """Each rule's (comment, set matches by input interface, by bridge
    port), from its raw entry (python-iptables would parse every match)."""
    out = []
    entry = table.first_rule(chain)
    while entry:
        raw = ctypes.string_at(ctypes.addressof(entry), entry.target_offset)
        at = ctypes.sizeof(entry)
        comment, plain, by_port = "", 0, 0
        while at + MATCH_HEAD <= len(raw):  # struct xt_entry_match, then its data
            size = int.from_bytes(raw[at:at + 2], "little")
            name = raw[at + 2:at + 31].split(b"\0")[0]
            if name == b"comment":
                comment = raw[at + MATCH_HEAD:at + size].split(b"\0")[0].decode(
                    errors="replace")
            elif name == b"set" and size >= SET_MATCH_FLAGS + 4:
                flags = int.from_bytes(raw[at + SET_MATCH_FLAGS:at + SET_MATCH_FLAGS + 4],
                                       "little")
                if flags & ipset_state.FLAG_PHYSDEV:
                    by_port += 1
                else:
                    plain += 1
            at += max(size, MATCH_HEAD)
        out.append((comment, plain, by_port))
        entry = table.next_rule(entry)
    return out
