"""A Python reading of what the classifier must count, for differential
fuzzing: a frame is an SMTP connection attempt iff this says so.

Written from the rules in docs/enforcement.md (What is counted, exactly):
Ethernet, at most two VLAN tags in the
frame, IPv4 (any options, no later fragment, the TCP header inside the
packet's total length) or IPv6 (at most six extension headers among
hop-by-hop, routing, destination options, AH and a first fragment, no
deeper than 1024 bytes, the TCP header inside the payload length), TCP with
a sane data offset, SYN alone, to an SMTP port.
"""

from __future__ import annotations

import ipaddress
import struct

VLAN = (0x8100, 0x88A8)
OPTS = {0, 43, 60}  # hop-by-hop, routing, destination options
AH, FRAG, TCP = 51, 44, 6
MAX_OFF = 1024


def attempt_key(frame: bytes, ports: set[int]) -> tuple[object, ...] | None:
    """The attempt's identity (family, addresses, ports, ISN), else None."""
    n = len(frame)
    if n < 14:
        return None
    (proto,) = struct.unpack_from("!H", frame, 12)
    off = 14
    for _ in range(2):
        if proto not in VLAN:
            break
        if n < off + 4:
            return None
        (proto,) = struct.unpack_from("!H", frame, off + 2)
        off += 4
    if proto == 0x0800:
        if n < off + 20:
            return None
        ver_ihl, ip_proto = frame[off], frame[off + 9]
        (total,) = struct.unpack_from("!H", frame, off + 2)
        (frag,) = struct.unpack_from("!H", frame, off + 6)
        if ip_proto != TCP or ver_ihl >> 4 != 4 or frag & 0x1FFF:
            return None
        ihl = (ver_ihl & 0xF) * 4
        if ihl < 20:
            return None
        l3_end = off + total
        family, addrs = 4, frame[off + 12:off + 20]
        off += ihl
    elif proto == 0x86DD:
        if n < off + 40 or frame[off] >> 4 != 6:
            return None
        (plen,) = struct.unpack_from("!H", frame, off + 4)
        nh = frame[off + 6]
        l3_end = off + 40 + plen
        family, addrs = 6, frame[off + 8:off + 40]
        off += 40
        for _ in range(6):
            if nh == TCP:
                break
            if off > MAX_OFF:
                return None
            if nh in OPTS or nh == AH:
                if n < off + 2:
                    return None
                # Options count 8-byte units beyond the first; AH 4-byte units beyond two.
                size = (frame[off + 1] + 1) * 8 if nh in OPTS else (frame[off + 1] + 2) * 4
                nh = frame[off]
                off += size
            elif nh == FRAG:
                if n < off + 8:
                    return None
                (fo,) = struct.unpack_from("!H", frame, off + 2)
                if fo & 0xFFF8:
                    return None
                nh = frame[off]
                off += 8
            else:
                return None
        if nh != TCP:
            return None
    else:
        return None
    if off > MAX_OFF or n < off + 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", frame, off)
    doff, flags = frame[off + 12] >> 4, frame[off + 13]
    if doff < 5 or off + doff * 4 > l3_end:
        return None
    if dport not in ports or flags & 0x17 != 0x02:
        return None
    return (family, addrs, sport, dport, seq)


def destination(key: tuple[object, ...]) -> str:
    """The address an attempt is recorded under in smtp_recent, as
    top_destinations shows it (IPv4, and v4-mapped IPv6, as plain IPv4)."""
    family, addrs = key[0], key[1]
    assert isinstance(addrs, bytes)
    if family == 4:
        return str(ipaddress.IPv4Address(addrs[4:]))
    ip = ipaddress.IPv6Address(addrs[16:])
    return str(ip.ipv4_mapped or ip)
