"""Rules as the kernel and libiptc hold them: raw entries (struct
ipt_entry/ip6t_entry, xt_entry_match headers and data, the target).

python-iptables builds a rule in ~0.2 ms (48,000 rules at 1,000 VMs), so
iptc_table builds the first of each shape with it and makes the others as
copies with what differs from one VM to the next written in (interface,
jump, hashlimit name, comment: each a fixed-size field). Reading walks the
entries the same way, for the comments and for what no rule's text shows:
a set match's bridge-port lookup (xt_set's IPSET_FLAG_PHYSDEV, which no
iptables option sets).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import replace
from typing import Any

from smtpguard.enforce import ipset_state
from smtpguard.enforce import iptables_render as R
from smtpguard.errors import EnforcerError

IFACE_AT = {"ipv4": 16, "ipv6": 64}  # ipt_ip.iniface, ip6t_ip6.iniface
TARGET_OFFSET_AT = {"ipv4": 88, "ipv6": 140}  # ipt_entry/ip6t_entry.target_offset


class RawRule:
    """A rule as libiptc takes it (an entry, its matches, its target)."""

    def __init__(self, raw: bytes, entry_type: Any) -> None:
        self.buf = (ctypes.c_ubyte * len(raw)).from_buffer_copy(raw)
        self.entry_type = entry_type

    @property
    def rule(self) -> Any:
        return self.buf

    @property
    def counters(self) -> tuple[int, int]:
        c = self.entry_type.from_buffer(self.buf).counters
        return int(c.pcnt), int(c.bcnt)

    @counters.setter
    def counters(self, value: tuple[int, int]) -> None:
        c = self.entry_type.from_buffer(self.buf).counters
        c.pcnt, c.bcnt = value


@functools.lru_cache(maxsize=1 << 17)
def shape(spec: R.Rule) -> R.Rule | None:
    """What a template is kept under: the rule with what differs from one VM
    to the next blanked (each a fixed-size field, written into a copy by
    _fill); None for what is not worth one (tallies, wildcards)."""
    if spec.tag.startswith("tally:"):
        return None
    shape = spec
    for name in (spec.iface, spec.physdev):
        if name and (name.endswith("+") or len(name) >= 16):
            return None
    if spec.iface:  # masks differ by length
        shape = replace(shape, iface=str(len(spec.iface)))
    if spec.physdev:
        shape = replace(shape, physdev=str(len(spec.physdev)))
    if spec.target in (R.vm_chain(spec.iface or ""), R.vm_chain(spec.physdev or "")):
        shape = replace(shape, target=R.VM_CHAIN)  # the dispatch's jump to a VM's chain
    if spec.limit:
        if len(spec.limit.name) >= 16:
            return None
        shape = replace(shape, limit=replace(spec.limit, name=""))
    return shape


def _put(raw: bytearray, at: int, size: int, text: str) -> None:
    data = text.encode()
    if len(data) >= size:
        raise EnforcerError(f"{text!r} does not fit {size} bytes")
    raw[at:at + size] = data + b"\0" * (size - len(data))


def fill(template: bytes, spec: R.Rule, family: R.Family, entry: Any) -> bytes:
    """The template with this rule's interface, jump, bucket and comment:
    struct ipt_entry/ip6t_entry, then xt_entry_match headers and data
    (physdev, hashlimit and comment each start with their string), then
    the target (a jump names its chain)."""
    raw = bytearray(template)
    head = ctypes.sizeof(entry)
    if spec.iface:
        _put(raw, IFACE_AT[family], 16, spec.iface)
    target_at = int.from_bytes(raw[TARGET_OFFSET_AT[family]:TARGET_OFFSET_AT[family] + 2],
                               "little")
    at = head
    while at + MATCH_HEAD <= target_at:
        size = int.from_bytes(raw[at:at + 2], "little")
        name = bytes(raw[at + 2:at + 31]).split(b"\0")[0]
        if name == b"physdev" and spec.physdev:
            _put(raw, at + MATCH_HEAD, 16, spec.physdev)
        elif name == b"hashlimit" and spec.limit:
            _put(raw, at + MATCH_HEAD, 16, spec.limit.name)
        elif name == b"comment":
            _put(raw, at + MATCH_HEAD, 256, spec.comment(family))
        at += max(size, MATCH_HEAD)
    if spec.target.startswith(R.VM_CHAIN):
        _put(raw, target_at + 2, 29, spec.target)
    return bytes(raw)


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
