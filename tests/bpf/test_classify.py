"""Crafted frames through the real classifier (BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import pytest

from conftest import past_a_tick
from frames import (
    ACK,
    AH,
    DSTOPTS,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    FRAGMENT,
    HOPOPTS,
    ROUTING,
    RST,
    SYN,
    TCP,
    UDP,
    answer,
    eth,
    ext,
    frag6,
    ipv4,
    ipv6,
    syn4,
    syn6,
    tcp,
)
from smtpguard.datapath import distinct, maps
from smtpguard.datapath.loader import Datapath
from smtpguard.datapath.snapshot import take
from smtpguard.datapath.testrun import test_run as run_prog

TC_ACT_UNSPEC = -1


def ingress(dp: Datapath, frame: bytes) -> None:
    assert run_prog(dp.ingress_fd, frame).retval == TC_ACT_UNSPEC


def egress(dp: Datapath, frame: bytes) -> None:
    assert run_prog(dp.egress_fd, frame).retval == TC_ACT_UNSPEC


def totals(dp: Datapath) -> dict[str, int]:
    """Counters summed over interfaces and ports."""
    out = dict.fromkeys(("attempts", "retransmits", "completed", "reset", "no_answer",
                         "packets", "entries"), 0)
    for _k, v in dp.table("smtp_stats").items():
        out["entries"] += 1
        for f in ("attempts", "retransmits", "completed", "reset", "no_answer", "packets"):
            out[f] += getattr(v, f)
    return out


def attempts(dp: Datapath) -> int:
    return totals(dp)["attempts"]


def test_ipv4_syn_counts_once_and_retransmit_does_not(dp: Datapath) -> None:
    """A retransmitted SYN (same ISN) is not a new attempt; a new ISN on the same 4-tuple is."""
    ingress(dp, syn4(seq=1))
    ingress(dp, syn4(seq=1))
    t = totals(dp)
    assert (t["attempts"], t["retransmits"]) == (1, 1)
    ingress(dp, syn4(seq=2))
    assert attempts(dp) == 2


def test_counts_are_per_port(dp: Datapath) -> None:
    """Each SMTP port gets its own counters; non-SMTP ports get no entry at all."""
    for port in (25, 465, 587, 2525, 80, 443, 2526):
        ingress(dp, syn4(dport=port, seq=port))
    ports = {k.port: v.attempts for k, v in dp.table("smtp_stats").items()}
    assert ports == {25: 1, 465: 1, 587: 1, 2525: 1}


def test_port_set_comes_from_the_map(dp: Datapath) -> None:
    """Changing the SMTP port set needs no recompile."""
    try:
        dp.set_ports([8025])
        ingress(dp, syn4(dport=8025))
        ingress(dp, syn4(dport=25))
        assert {k.port for k, _ in dp.table("smtp_stats").items()} == {8025}
    finally:
        dp.set_ports([25, 465, 587, 2525])


@pytest.mark.parametrize(
    ("frame", "counted"),
    [
        pytest.param(syn4(), True, id="plain-ipv4"),
        pytest.param(syn4(vlans=((ETH_P_8021Q, 10),)), True, id="vlan"),
        pytest.param(syn4(vlans=((ETH_P_8021AD, 10), (ETH_P_8021Q, 20))), True, id="qinq"),
        pytest.param(syn4(vlans=((ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3))),
                     False, id="three-tags-too-deep"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN),
                              options=b"\x01" * 12), ETH_P_IP), True, id="ipv4-options"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN),
                              options=b"\x01" * 40), ETH_P_IP), True, id="ipv4-max-options"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN), frag=0x2000),
                         ETH_P_IP), True, id="ipv4-first-fragment"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN), frag=0x0010),
                         ETH_P_IP), False, id="ipv4-later-fragment"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN), total_len=30),
                         ETH_P_IP), False, id="ipv4-total-length-lies"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN), proto=UDP),
                         ETH_P_IP), False, id="udp-to-25"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN, doff=4)),
                         ETH_P_IP), False, id="tcp-doff-too-small"),
        pytest.param(syn4()[:14 + 20 + 12], False, id="truncated-tcp"),
        # The kernel's test run refuses frames shorter than their L3 header;
        # tests/integration/test_malformed.py injects those on a live link.
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN),
                              options=b"\x01" * 40), ETH_P_IP)[:14 + 40], False,
                     id="truncated-ipv4-options"),
        pytest.param(syn6(), True, id="plain-ipv6"),
        pytest.param(eth(ipv6("fdac:25::b", "fdac:26::1",
                              ext(ROUTING, 1) + ext(DSTOPTS) + ext(FRAGMENT, 0)
                              + frag6(TCP) + tcp(40000, 25, SYN), nexthdr=HOPOPTS),
                         ETH_P_IPV6), True, id="ipv6-ext-chain"),
        pytest.param(eth(ipv6("fdac:25::b", "fdac:26::1",
                              bytes([TCP, 1]) + bytes(10) + tcp(40000, 25, SYN), nexthdr=AH),
                         ETH_P_IPV6), True, id="ipv6-ah"),
        pytest.param(eth(ipv6("fdac:25::b", "fdac:26::1",
                              frag6(TCP, offset=8) + tcp(40000, 25, SYN), nexthdr=FRAGMENT),
                         ETH_P_IPV6), False, id="ipv6-later-fragment"),
        pytest.param(eth(ipv6("fdac:25::b", "fdac:26::1",
                              b"".join(ext(DSTOPTS) for _ in range(7)) + ext(TCP)
                              + tcp(40000, 25, SYN), nexthdr=DSTOPTS),
                         ETH_P_IPV6), False, id="ipv6-chain-too-long"),
        pytest.param(eth(ipv6("fdac:25::b", "fdac:26::1", tcp(40000, 25, SYN), payload_len=8),
                         ETH_P_IPV6), False, id="ipv6-payload-length-lies"),
        pytest.param(eth(ipv6("fdac:25::b", "fdac:26::1", ext(TCP, 30)[:20],
                              nexthdr=HOPOPTS), ETH_P_IPV6), False, id="ipv6-truncated-ext"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN | ACK)),
                         ETH_P_IP), False, id="syn-ack-from-vm"),
        pytest.param(eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, SYN | RST)),
                         ETH_P_IP), False, id="syn-rst"),
        pytest.param(eth(b"\x00" * 64, 0x0806), False, id="arp"),
    ],
)
def test_classification(dp: Datapath, frame: bytes, counted: bool) -> None:
    """Malformed, truncated or non-SYN frames pass untouched and are never counted;
    SYNs behind VLAN tags, IPv4 options and IPv6 extension headers are."""
    ingress(dp, frame)
    assert attempts(dp) == (1 if counted else 0)


def test_bytes_and_packets_to_smtp_ports(dp: Datapath) -> None:
    """Every packet to an SMTP port adds its length; non-SMTP traffic adds nothing."""
    data = eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, ACK, payload=b"x" * 100)),
               ETH_P_IP)
    for _ in range(3):
        ingress(dp, data)
    ingress(dp, eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 80, ACK)), ETH_P_IP))
    ((_, v),) = dp.table("smtp_stats").items()
    assert (v.packets, v.bytes, v.attempts) == (3, 3 * len(data), 0)


@pytest.mark.parametrize("family", [4, 6])
def test_outcomes_are_decided_once(dp: Datapath, family: int) -> None:
    """A SYN-ACK completes an attempt, a RST resets it, repeats and late answers
    change nothing, and an answer to an unknown ISN is ignored."""
    syn = syn4 if family == 4 else syn6
    ingress(dp, syn(seq=100))
    ingress(dp, syn(seq=200))
    egress(dp, answer(SYN | ACK, 100, family))
    egress(dp, answer(SYN | ACK, 100, family))  # server retransmission
    egress(dp, answer(RST | ACK, 200, family))
    egress(dp, answer(RST | ACK, 100, family))  # a later reset of a completed attempt
    egress(dp, answer(SYN | ACK, 999, family))  # answers nothing we saw
    t = totals(dp)
    assert (t["attempts"], t["completed"], t["reset"], t["no_answer"]) == (2, 1, 1, 0)


def test_no_answer_is_judged_on_retransmission(dp: Datapath) -> None:
    """A SYN retransmitted after the no-answer delay, with no reply seen, counts
    once as no_answer."""
    try:
        dp.set_no_answer(1e-9)
        ingress(dp, syn4(seq=5))
        past_a_tick()  # the delay has passed on the classifier's clock
        ingress(dp, syn4(seq=5))
        ingress(dp, syn4(seq=5))
        egress(dp, answer(SYN | ACK, 5))  # too late: the outcome stands
        t = totals(dp)
        assert (t["attempts"], t["retransmits"], t["no_answer"], t["completed"]) == (1, 2, 1, 0)
    finally:
        dp.set_no_answer(2.0)


def test_destination_sketch_matches_the_model(dp: Datapath) -> None:
    """The kernel's sketch (bitmap and registers) equals the Python model's for
    the same destinations, so the model's measured accuracy
    (tests/unit/test_distinct.py) is the kernel's; both windows report it."""
    model = distinct.Sketch()
    for i in range(300):
        dst = f"198.19.{i // 200}.{i % 200 + 1}"
        ingress(dp, syn4(dst=dst, seq=i))
        distinct.add(model, distinct.addr_hash(maps.addr_bytes(dst)))
    ((_, sketch),) = dp.table("smtp_dests").items()
    for tier in (sketch.fine, sketch.coarse):
        got = distinct.merge(distinct.from_slot(s) for s in tier if s.epoch)
        assert (got.bits, got.regs) == (model.bits, model.regs)
    (snap,) = take(dp.table("smtp_stats"), dp.table("smtp_dests")).ifaces.values()
    want = round(distinct.estimate(model), 1)
    assert snap.destinations["1m"] == snap.destinations["1h"] == want
    assert abs(want - 300) <= 300 * 3 * 0.02
