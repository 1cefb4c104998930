"""ctypes mirrors of the map types in bpf/smtp_common.h.

Must stay in sync with bpf/smtp_common.h; tests/bpf/test_layout.py compares
every size with the types bcc builds from the C source.
"""

from __future__ import annotations

import ctypes
import ipaddress

HLL_BITS = 8
HLL_REGS = 1 << HLL_BITS
LC_BITS = 2048
LC_WORDS = LC_BITS // 64
FINE_SLOTS = 8
COARSE_SLOTS = 16
FINE_SLOT_SHIFT = 33  # 8.6 s
COARSE_SLOT_SHIFT = 38  # 4.6 min
SLOT_LIVE = 1 << 63  # a written slot's epoch carries it (SLOT_LIVE in bpf/smtp_common.h)

FAMILY_V4 = 4
FAMILY_V6 = 6

CONN_PENDING = 0
CONN_COMPLETED = 1
CONN_RESET = 2
CONN_NO_ANSWER = 3


# Must stay in sync with struct smtp_key in bpf/smtp_common.h
class SmtpKey(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


# Must stay in sync with struct smtp_stats in bpf/smtp_common.h
class SmtpStats(ctypes.Structure):
    _fields_ = [
        ("attempts", ctypes.c_uint64),
        ("retransmits", ctypes.c_uint64),
        ("completed", ctypes.c_uint64),
        ("reset", ctypes.c_uint64),
        ("no_answer", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("last_attempt_ns", ctypes.c_uint64),
    ]


# Must stay in sync with struct conn_key in bpf/smtp_common.h
class ConnKey(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("isn", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
    ]


# Must stay in sync with struct conn_val in bpf/smtp_common.h
class ConnVal(ctypes.Structure):
    _fields_ = [("first_ns", ctypes.c_uint64), ("state", ctypes.c_uint64)]


# Must stay in sync with struct recent_key in bpf/smtp_common.h
class RecentKey(ctypes.Structure):
    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("daddr", ctypes.c_uint8 * 16),
    ]


# Must stay in sync with struct recent_val in bpf/smtp_common.h
class RecentVal(ctypes.Structure):
    _fields_ = [
        ("attempts", ctypes.c_uint64),
        ("first_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
    ]


# Must stay in sync with struct hll_slot in bpf/smtp_common.h
class HllSlot(ctypes.Structure):
    _fields_ = [
        ("epoch", ctypes.c_uint64),
        ("bits", ctypes.c_uint64 * LC_WORDS),
        ("reg", ctypes.c_uint8 * HLL_REGS),
    ]


# Must stay in sync with struct dest_sketch in bpf/smtp_common.h
class DestSketch(ctypes.Structure):
    _fields_ = [("fine", HllSlot * FINE_SLOTS), ("coarse", HllSlot * COARSE_SLOTS)]


# Must stay in sync with struct smtp_config in bpf/smtp_common.h
class SmtpConfig(ctypes.Structure):
    _fields_ = [("no_answer_ns", ctypes.c_uint64), ("slot_offset_ns", ctypes.c_uint64),
                ("trip_mark", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


# Must stay in sync with struct trip in bpf/smtp_common.h
class Trip(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint64), ("at", ctypes.c_uint64)]


def slot_epoch(raw: int) -> int | None:
    """A sketch slot's epoch (clock >> shift), or None for a slot never written.
    Slots written before the live bit existed hold the bare epoch: still read."""
    if raw & SLOT_LIVE:
        return raw & ~SLOT_LIVE
    return raw or None


MIRRORS: dict[str, tuple[type[ctypes.Structure] | type[ctypes.c_uint32], type]] = {
    "smtp_stats": (SmtpKey, SmtpStats),
    "smtp_conns": (ConnKey, ConnVal),
    "smtp_dests": (ctypes.c_uint32, DestSketch),
    "smtp_recent": (RecentKey, RecentVal),
    "smtp_config": (ctypes.c_uint32, SmtpConfig),
    "smtp_full": (ctypes.c_uint32, ctypes.c_uint64),
    "smtp_wake": (ctypes.c_uint32, ctypes.c_uint32),
    "smtp_trip": (ctypes.c_uint32, Trip),
}
# Must stay in sync with FULL_* in bpf/smtp_common.h
FULL_SLOTS = {"smtp_stats": 0, "smtp_dests": 1}


def addr_bytes(addr: str) -> bytes:
    """An address as the datapath stores it: 16 bytes, IPv4 v4-mapped."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


def addr_str(raw: bytes) -> str:
    """The inverse of addr_bytes."""
    ip = ipaddress.IPv6Address(bytes(raw))
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)
