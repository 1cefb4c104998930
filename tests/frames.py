"""Hand-built frames for the BPF tests (checksums are not checked by tc)."""

from __future__ import annotations

import ipaddress
import struct

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
HOPOPTS, ROUTING, FRAGMENT, DSTOPTS, AH, TCP, UDP = 0, 43, 44, 60, 51, 6, 17

VM_MAC = bytes.fromhex("525400000001")
GW_MAC = bytes.fromhex("525400000002")


def tcp(sport: int, dport: int, flags: int, seq: int = 1000, ack: int = 0,
        payload: bytes = b"", doff: int = 5) -> bytes:
    opts = b"\x01" * ((doff - 5) * 4)
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags,
                       65535, 0, 0) + opts + payload


def ipv4(src: str, dst: str, payload: bytes, proto: int = TCP, options: bytes = b"",
         frag: int = 0, total_len: int | None = None) -> bytes:
    ihl = 5 + len(options) // 4
    tl = total_len if total_len is not None else ihl * 4 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tl, 1, frag, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + options + payload


def ipv6(src: str, dst: str, payload: bytes, nexthdr: int = TCP,
         payload_len: int | None = None) -> bytes:
    pl = payload_len if payload_len is not None else len(payload)
    return struct.pack("!IHBB16s16s", 0x60000000, pl, nexthdr, 64,
                       ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed) + payload


def ext(nexthdr: int, length8: int = 0) -> bytes:
    """Hop-by-hop / routing / destination options header of (length8+1)*8 bytes."""
    body = bytes((length8 + 1) * 8 - 2)
    return bytes([nexthdr, length8]) + body


def frag6(nexthdr: int, offset: int = 0, more: bool = False) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, (offset << 3) | int(more), 7)


def eth(payload: bytes, ethertype: int, vlans: tuple[tuple[int, int], ...] = (),
        src: bytes = VM_MAC, dst: bytes = GW_MAC) -> bytes:
    """vlans: (tpid, vid) from the outside in."""
    out = dst + src
    for tpid, vid in vlans:
        out += struct.pack("!HH", tpid, vid)
    return out + struct.pack("!H", ethertype) + payload


def syn4(src: str = "198.18.0.11", dst: str = "198.19.0.1", sport: int = 40000,
         dport: int = 25, seq: int = 1000, **kw: object) -> bytes:
    return eth(ipv4(src, dst, tcp(sport, dport, SYN, seq)), ETH_P_IP, **kw)  # type: ignore[arg-type]


def syn6(src: str = "fdac:25::b", dst: str = "fdac:26::1", sport: int = 40000,
         dport: int = 25, seq: int = 1000) -> bytes:
    return eth(ipv6(src, dst, tcp(sport, dport, SYN, seq)), ETH_P_IPV6)


def answer(flags: int, isn: int, family: int = 4) -> bytes:
    """The sink's reply to syn4/syn6(seq=isn), as the VM's egress sees it."""
    seg = tcp(25, 40000, flags, seq=777, ack=isn + 1)
    if family == 4:
        return eth(ipv4("198.19.0.1", "198.18.0.11", seg), ETH_P_IP)
    return eth(ipv6("fdac:26::1", "fdac:25::b", seg), ETH_P_IPV6)
