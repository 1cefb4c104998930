"""The record of recent SMTP destinations: a VM's attempts per address, exact.

The classifier keeps one entry per (interface, destination address) in the
smtp_recent LRU (struct recent_key / recent_val in bpf/smtp_common.h) and adds
one to it for every attempt it counts in smtp_stats, retransmissions never.
The counts are exact while an entry stays; a VM spraying more addresses than
the map holds pushes out the least recently used ones first.

`table` is a map with the RecentKey/RecentVal mirrors: the agent's PinnedMap
(datapath/bpfsys.py) or a bcc table; both offer items() and del.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from smtpguard.datapath.maps import addr_str


@dataclass(frozen=True)
class Destination:
    """One address a VM tried, summed over its interfaces."""

    address: str  # "198.19.0.5" or "fdac:26::5" (v4-mapped shown as plain IPv4)
    attempts: int
    first_ns: int  # CLOCK_MONOTONIC ns, to the tick (the classifier's coarse clock)
    last_ns: int


def _order(d: Destination) -> tuple[int, int, int]:
    """Most attempts first; ties in address order, IPv4 before IPv6."""
    ip = ipaddress.ip_address(d.address)
    return (-d.attempts, ip.version, int(ip))


def top_destinations(table: Any, ifindexes: Iterable[int],
                     limit: int | None = 10) -> list[Destination]:
    """A VM's destinations (summed over its interfaces, by address), most
    attempts first (ties: address order); limit None = all."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, not {limit}")
    wanted = set(ifindexes)
    if not wanted:
        return []
    # By the 16 stored bytes: one per address, since IPv4 is always v4-mapped.
    acc: dict[bytes, list[int]] = {}
    for k, v in table.items():
        if k.ifindex not in wanted:
            continue
        addr = bytes(k.daddr)
        a = acc.get(addr)
        if a is None:
            acc[addr] = [v.attempts, v.first_ns, v.last_ns]
        else:
            a[0] += v.attempts
            a[1] = min(a[1], v.first_ns)
            a[2] = max(a[2], v.last_ns)
    out = sorted((Destination(addr_str(addr), *a) for addr, a in acc.items()), key=_order)
    return out if limit is None else out[:limit]


def forget(table: Any, ifindexes: Iterable[int]) -> int:
    """Delete these interfaces' entries (a VM starting afresh, or gone);
    returns how many."""
    wanted = set(ifindexes)
    if not wanted:
        return 0
    # Keys first, deletes after: deleting while the kernel walks its buckets
    # would make the walk skip or repeat entries.
    doomed = [k for k, _ in table.items() if k.ifindex in wanted]
    removed = 0
    for k in doomed:
        try:
            del table[k]
        except KeyError:
            continue  # pushed out by the LRU meanwhile
        removed += 1
    return removed
