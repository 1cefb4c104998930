"""Distinct-destination estimates from the sketches the classifier keeps.

Each time slot holds a 2048-bit linear-counting bitmap and 256 HyperLogLog
registers (bpf/smtp_common.h). Up to about 6,000 destinations in a window
the bitmap answers (standard error under 3%, near exact for a handful);
beyond, HyperLogLog does (1.04/sqrt(256) = 6.5%). tests/unit/test_distinct.py
measures both, and tests/bpf proves the kernel builds the same sketch as
this model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from smtpguard.datapath.maps import HLL_BITS, HLL_REGS, LC_BITS

_HASH_BITS = 32
_LC_SHIFT = _HASH_BITS - 11  # the bitmap index: the hash's top 11 bits
LC_MAX_LOAD = 0.95  # past this share of set bits, trust HyperLogLog instead


@dataclass
class Sketch:
    """bits: LC_BITS bits, bit i of word w at position 64*w + i. The
    registers are kept as the unmerged parts they came from and merged only
    when the bitmap is too full to answer (most reads never need them)."""

    bits: int = 0
    parts: list[bytes] = field(default_factory=list)

    @property
    def regs(self) -> list[int]:
        if not self.parts:
            return [0] * HLL_REGS
        if len(self.parts) > 1:
            self.parts = [bytes(map(max, zip(*self.parts, strict=True)))]
        return list(self.parts[0])


def from_slot(slot: Any) -> Sketch:
    """A Sketch from a ctypes HllSlot."""
    return Sketch(int.from_bytes(bytes(slot.bits), "little"), [bytes(slot.reg)])


def merge(sketches: Iterable[Sketch]) -> Sketch:
    """The sketch of the union."""
    out = Sketch()
    for s in sketches:
        out.bits |= s.bits
        out.parts.extend(s.parts)
    return out


def addr_hash(addr16: bytes) -> int:
    """The classifier's addr_hash."""
    w = [int.from_bytes(addr16[i : i + 4], "little") for i in range(0, 16, 4)]
    mask = 0xFFFFFFFF
    h = (w[0] * 0x9E3779B1) & mask
    h = ((h ^ w[1]) * 0x85EBCA77) & mask
    h = ((h ^ w[2]) * 0xC2B2AE3D) & mask
    h = ((h ^ w[3]) * 0x27D4EB2F) & mask
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def add(s: Sketch, h: int) -> None:
    """The classifier's hll_add."""
    s.bits |= 1 << ((h >> _LC_SHIFT) & (LC_BITS - 1))
    idx = h & (HLL_REGS - 1)
    w = h >> HLL_BITS
    rank = (w & -w).bit_length() if w else _HASH_BITS - HLL_BITS + 1
    regs = s.regs
    regs[idx] = max(regs[idx], rank)
    s.parts = [bytes(regs)]


def hll_estimate(regs: list[int]) -> float:
    m = len(regs)
    alpha = 0.7213 / (1 + 1.079 / m)
    raw = alpha * m * m / sum(2.0 ** -r for r in regs)
    zeros = regs.count(0)
    if raw <= 2.5 * m and zeros:
        return m * math.log(m / zeros)
    if raw > (1 << _HASH_BITS) / 30:
        return -(1 << _HASH_BITS) * math.log(1 - raw / (1 << _HASH_BITS))
    return raw


def estimate(s: Sketch) -> float:
    """Distinct items added to the sketch."""
    zeros = LC_BITS - s.bits.bit_count()
    if zeros >= LC_BITS * (1 - LC_MAX_LOAD):
        return LC_BITS * math.log(LC_BITS / zeros)
    return hll_estimate(s.regs)
