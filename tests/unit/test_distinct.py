"""Accuracy of the distinct-destination sketch, measured on the Python model
that tests/bpf proves identical to the kernel's."""

from __future__ import annotations

import ipaddress
import random
import statistics

import pytest

from smtpguard.datapath import distinct, maps


def sketch(addrs: list[str]) -> distinct.Sketch:
    s = distinct.Sketch()
    for a in addrs:
        distinct.add(s, distinct.addr_hash(maps.addr_bytes(a)))
    return s


def errors(n: int, trials: int, seed: int) -> list[float]:
    """Relative errors over address sets alike to what bots walk: runs of
    sequential IPv4 addresses, and random IPv6 ones."""
    rng = random.Random(seed)
    out = []
    for trial in range(trials):
        if trial % 2:
            start = rng.getrandbits(31)
            addrs = [str(ipaddress.IPv4Address(start + i)) for i in range(n)]
        else:
            addrs = [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(n)]
        out.append(distinct.estimate(sketch(addrs)) / n - 1)
    return out


def test_a_handful_is_exact() -> None:
    """An honest VM's few relays are counted exactly."""
    for n in range(0, 11):
        assert round(distinct.estimate(sketch([f"198.19.0.{i + 1}" for i in range(n)]))) == n


@pytest.mark.parametrize(("n", "sd_bound"), [(100, 0.02), (1000, 0.025), (5000, 0.035)])
def test_bitmap_range_error(n: int, sd_bound: float) -> None:
    """Up to ~6,000 destinations a window: unbiased, standard deviation <= 3.5%."""
    errs = errors(n, 30 if n < 5000 else 10, n)
    assert abs(statistics.mean(errs)) < 0.015
    assert statistics.pstdev(errs) < sd_bound


def test_hll_range_error() -> None:
    """Past the bitmap's range, HyperLogLog: unbiased, standard deviation near
    the theoretical 6.5%."""
    errs = errors(20000, 12, 3)
    assert abs(statistics.mean(errs)) < 0.04
    assert statistics.pstdev(errs) < 0.085


def test_merge_is_union() -> None:
    """Merging two sketches estimates the union, not the sum."""
    a = sketch([f"198.19.0.{i + 1}" for i in range(50)])
    b = sketch([f"198.19.0.{i + 1}" for i in range(25, 75)])
    assert round(distinct.estimate(distinct.merge([a, b]))) in range(73, 78)
    assert distinct.estimate(distinct.merge([a, a])) == distinct.estimate(a)


def test_addr_bytes_round_trip() -> None:
    for addr in ("198.18.0.1", "fdac:25::b", "::1"):
        assert maps.addr_str(maps.addr_bytes(addr)) == addr
