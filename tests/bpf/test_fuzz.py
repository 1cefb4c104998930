"""Differential fuzzing: hostile and broken frames through the real
classifier, checked against a Python reading of the rules (reference.py).
No frame crashes it, and it counts exactly the frames that are attempts."""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import attempt_key, destination

from conftest import PORTS, clear
from frames import (
    AH,
    DSTOPTS,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    FRAGMENT,
    HOPOPTS,
    ROUTING,
    SYN,
    TCP,
    eth,
    ext,
    frag6,
    ipv4,
    ipv6,
    syn4,
    syn6,
    tcp,
)
from smtpguard.datapath import recent
from smtpguard.datapath.loader import Datapath
from smtpguard.datapath.testrun import test_run as run_prog

SEEDS = [
    syn4(), syn6(), syn4(vlans=((ETH_P_8021Q, 5),)),
    syn4(vlans=((ETH_P_8021AD, 5), (ETH_P_8021Q, 6))),
    eth(ipv4("198.18.0.11", "198.19.0.9", tcp(1234, 587, SYN, seq=9), options=b"\x01" * 8),
        ETH_P_IP),
    eth(ipv4("198.18.0.11", "198.19.0.9", tcp(1234, 25, SYN, seq=9), frag=0x2000), ETH_P_IP),
    eth(ipv6("fdac:25::b", "fdac:26::1", ext(ROUTING) + ext(DSTOPTS, 1) + frag6(AH)
             + bytes([TCP, 1]) + bytes(10) + tcp(4000, 465, SYN), nexthdr=HOPOPTS),
        ETH_P_IPV6),
    eth(ipv6("fdac:25::b", "fdac:26::1", frag6(TCP) + tcp(4000, 2525, SYN), nexthdr=FRAGMENT),
        ETH_P_IPV6),
]


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["mutate", "random", "truncate", "field", "length"]))
    if kind == "random":
        return draw(st.binary(min_size=54, max_size=300))
    frame = bytearray(draw(st.sampled_from(SEEDS)))
    if kind == "truncate":
        return bytes(frame[:draw(st.integers(54, len(frame)))])
    if kind == "length":
        # The IP header's own length field lies (IPv4 total, IPv6 payload).
        l3 = 14 + 4 * sum(1 for i in (12, 16) if frame[i:i + 2] in (b"\x81\x00", b"\x88\xa8"))
        pos = l3 + (2 if frame[l3] >> 4 == 4 else 4)
        frame[pos:pos + 2] = draw(st.integers(0, 120)).to_bytes(2, "big")
        return bytes(frame)
    if kind == "field":
        # Header fields are mostly 16-bit words; small values make lying lengths.
        pos = draw(st.integers(0, min(len(frame), 120) // 2 - 1)) * 2
        value = draw(st.one_of(st.integers(0, 80), st.integers(0, 0xFFFF)))
        frame[pos:pos + 2] = value.to_bytes(2, "big")
        return bytes(frame)
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(frame) - 1))
        frame[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        frame += draw(st.binary(max_size=40))
    return bytes(frame)


def attempts(dp: Datapath) -> int:
    return sum(v.attempts for _, v in dp.table("smtp_stats").items())


def recorded(dp: Datapath) -> dict[str, int]:
    """The record of recent destinations, over every interface."""
    ifindexes = {k.ifindex for k in dp.table("smtp_recent").keys()}
    return {d.address: d.attempts
            for d in recent.top_destinations(dp.table("smtp_recent"), ifindexes, None)}


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(frame=hostile_frames())
def test_classifier_counts_exactly_the_attempts(loaded: Datapath, frame: bytes) -> None:
    """The kernel counts a frame iff the reference says it is an attempt, once
    however often it is seen, under the destination the reference reads from
    it, and always passes it on (TC_ACT_UNSPEC)."""
    clear(loaded)
    key = attempt_key(frame, set(PORTS))
    for _ in range(2):  # the second copy is a retransmission
        try:
            assert run_prog(loaded.ingress_fd, frame).retval == -1
        except OSError as exc:  # the kernel refuses to build an skb from it
            assert exc.errno == errno.EINVAL
            key = None
    assert attempts(loaded) == (0 if key is None else 1), frame.hex()
    assert recorded(loaded) == ({} if key is None else {destination(key): 1}), frame.hex()


def test_seeds_are_attempts() -> None:
    """The fuzzer starts from frames that are attempts (so mutations matter)."""
    assert all(attempt_key(f, set(PORTS)) is not None for f in SEEDS[:5] + SEEDS[6:])
    assert attempt_key(SEEDS[5], set(PORTS)) is not None  # a first fragment counts
