"""The trip wire: the in-kernel stop between a VM's crossing of a block
threshold and the agent's block (bpf/smtp_common.h, struct trip).

The agent arms each interface of a VM it would block after `remaining` more
attempts: smtp_trip[ifindex] = {n: 0, at: remaining}. The classifier counts
the interface's new attempts in n, lets the at-th through (it is the one
that crosses) and ORs the policy's datapath.trip_mark into skb->mark of every
SMTP SYN after it, which the nftables tables reject (nft_chains.py, the smtp
chain's first rule after the relays). The agent, woken by that very attempt,
decides the block as always and disarms; until then nothing more gets out,
however fast the VM opens connections.

Arming writes n = 0 with a budget computed from counters read moments
before; what the VM attempted in between (microseconds) is forgiven once.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from smtpguard.datapath.maps import Trip


def arm(table: Any, ifindex: int, remaining: int) -> None:
    """Trip after `remaining` more attempts (at least one: the crossing one)."""
    table[ctypes.c_uint32(ifindex)] = Trip(0, max(1, int(remaining)))


def disarm(table: Any, ifindex: int) -> None:
    try:
        del table[ctypes.c_uint32(ifindex)]
    except KeyError:
        pass


def left(table: Any, ifindex: int) -> int | None:
    """Attempts still allowed before the wire trips (0: tripped), None when
    not armed."""
    try:
        t = table[ctypes.c_uint32(ifindex)]
    except KeyError:
        return None
    return max(0, int(t.at) - int(t.n)) if t.at else None


def disarm_all(table: Any) -> None:
    table.clear()


def census(table: Any) -> tuple[int, int]:
    """(armed, tripped): wires counting down, and wires whose budget is spent
    (the classifier marks their SYNs until the agent blocks and disarms).
    One batched read of the map."""
    armed = tripped = 0
    for _, values, n in table.batches():
        # Decoded from the batch's buffer (ctypes would build a struct per entry).
        raw = memoryview(values).cast("B")[:n * ctypes.sizeof(Trip)]
        for got, at in struct.iter_unpack("=QQ", raw):
            if at:
                if got >= at:
                    tripped += 1
                else:
                    armed += 1
    return armed, tripped
