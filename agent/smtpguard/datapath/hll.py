"""HyperLogLog estimates from the registers the classifier keeps.

The datapath keeps 256 registers per time slot (bpf/smtp_common.h): the
standard error is 1.04/sqrt(256) = 6.5% for large counts; below about 640
destinations the linear-counting branch applies and the error is a few
percent (tests/unit/test_hll.py measures it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from smtpguard.datapath.maps import HLL_BITS, HLL_REGS

_HASH_BITS = 32


def merge(slots: Iterable[Sequence[int]]) -> list[int]:
    """Register-wise maximum: the sketch of the union of the slots."""
    out = [0] * HLL_REGS
    for regs in slots:
        out = [a if a >= b else b for a, b in zip(out, regs, strict=True)]
    return out


def estimate(regs: Sequence[int]) -> float:
    """Distinct items seen, from HLL_REGS registers."""
    m = len(regs)
    alpha = 0.7213 / (1 + 1.079 / m)
    raw = alpha * m * m / sum(2.0 ** -r for r in regs)
    zeros = regs.count(0) if isinstance(regs, list) else sum(1 for r in regs if r == 0)
    if raw <= 2.5 * m and zeros:
        return m * math.log(m / zeros)
    if raw > (1 << _HASH_BITS) / 30:
        return -(1 << _HASH_BITS) * math.log(1 - raw / (1 << _HASH_BITS))
    return raw


def addr_hash(addr16: bytes) -> int:
    """The classifier's addr_hash, for tests and the benchmark."""
    w = [int.from_bytes(addr16[i : i + 4], "little") for i in range(0, 16, 4)]
    mask = 0xFFFFFFFF
    h = (w[0] * 0x9E3779B1) & mask
    h = ((h ^ w[1]) * 0x85EBCA77) & mask
    h = ((h ^ w[2]) * 0xC2B2AE3D) & mask
    h ^= w[3]
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h


def add(regs: list[int], h: int) -> None:
    """The classifier's hll_add on a Python register list."""
    idx = h & (HLL_REGS - 1)
    w = h >> HLL_BITS
    rank = (w & -w).bit_length() if w else _HASH_BITS - HLL_BITS + 1
    regs[idx] = max(regs[idx], rank)
