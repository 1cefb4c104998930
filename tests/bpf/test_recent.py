"""The record of recent destinations (smtp_recent) through the real classifier."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PORTS, coarse_ns, past_a_tick
from frames import ACK, ETH_P_IP, SYN, eth, ipv4, syn4, syn6, tcp
from smtpguard.datapath import recent
from smtpguard.datapath.bpfsys import PROG_TEST_RUN, bpf, obj_get, obj_pin
from smtpguard.datapath.build import PROGRAMS
from smtpguard.datapath.loader import Datapath, Sizes
from smtpguard.datapath.testrun import _TestAttr
from smtpguard.datapath.testrun import test_run as run_prog

LO = socket.if_nametoindex("lo")  # the device of a test run without a context


class _SkbHead(ctypes.Structure):
    # struct __sk_buff up to ifindex: the kernel takes a shorter context and
    # zero-fills the rest; ifindex > 1 runs the program on that device.
    _fields_ = [(f, ctypes.c_uint32) for f in (
        "len", "pkt_type", "mark", "queue_mapping", "protocol", "vlan_present", "vlan_tci",
        "vlan_proto", "priority", "ingress_ifindex", "ifindex")]


def ingress_on(dp: Datapath, frame: bytes, ifindex: int = LO) -> None:
    """Run the ingress program on frame as if it arrived from ifindex."""
    buf = ctypes.create_string_buffer(frame, len(frame))
    ctx = _SkbHead(ifindex=ifindex)
    attr = _TestAttr(prog_fd=dp.ingress_fd, data_size_in=len(frame),
                     data_in=ctypes.addressof(buf), repeat=1,
                     ctx_size_in=ctypes.sizeof(ctx), ctx_in=ctypes.addressof(ctx))
    bpf(PROG_TEST_RUN, attr)
    assert ctypes.c_int32(attr.retval).value == -1


@pytest.fixture
def other_ifindex() -> Iterator[int]:
    """A second real interface (ifb: no peer, no traffic), removed afterwards."""
    from pyroute2 import IPRoute

    name = f"smtpgt{uuid.uuid4().hex[:8]}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="ifb")
        try:
            yield ipr.link_lookup(ifname=name)[0]
        finally:
            ipr.link("del", ifname=name)


def record(dp: Datapath, *ifindexes: int) -> dict[str, int]:
    return {d.address: d.attempts
            for d in recent.top_destinations(dp.table("smtp_recent"), ifindexes or [LO], None)}


def stats_attempts(dp: Datapath) -> int:
    return sum(v.attempts for _, v in dp.table("smtp_stats").items())


# Destinations with how many attempts each gets; IPv4 and IPv6, ties included.
PLAN = {
    "198.19.0.5": 7, "198.19.0.10": 3, "198.19.1.1": 3, "10.0.0.1": 1,
    "fdac:26::5": 5, "fdac:26::1:0": 3, "2001:db8::25": 1,
}


def send_plan(dp: Datapath, ifindex: int = LO, isn0: int = 0) -> None:
    """Every attempt of PLAN on ifindex, each SYN sent twice (the second is
    a retransmission), ports and source ports varied."""
    isn = isn0
    for dst, n in PLAN.items():
        for i in range(n):
            isn += 1
            syn = syn6 if ":" in dst else syn4
            frame = syn(dst=dst, dport=PORTS[i % len(PORTS)], sport=40000 + i, seq=isn)
            ingress_on(dp, frame, ifindex)
            ingress_on(dp, frame, ifindex)


def test_counts_each_attempt_once_per_destination(dp: Datapath) -> None:
    """Each counted attempt adds exactly one to its destination, whatever the
    port; retransmitted SYNs add nothing, so the record sums to the attempts
    of smtp_stats. Most attempts come first, ties in address order (IPv4
    before IPv6), IPv4 shown plain."""
    t0 = coarse_ns()
    send_plan(dp)
    t1 = coarse_ns()
    got = recent.top_destinations(dp.table("smtp_recent"), [LO], limit=None)
    assert [(d.address, d.attempts) for d in got] == [
        ("198.19.0.5", 7), ("fdac:26::5", 5), ("198.19.0.10", 3), ("198.19.1.1", 3),
        ("fdac:26::1:0", 3), ("10.0.0.1", 1), ("2001:db8::25", 1)]
    assert sum(d.attempts for d in got) == stats_attempts(dp) == sum(PLAN.values())
    for d in got:
        assert t0 <= d.first_ns <= d.last_ns <= t1
        assert d.attempts > 1 or d.first_ns == d.last_ns
    top = recent.top_destinations(dp.table("smtp_recent"), [LO])
    assert top == got[:10]
    assert recent.top_destinations(dp.table("smtp_recent"), [LO], limit=2) == got[:2]


def test_only_new_attempts_are_recorded(dp: Datapath) -> None:
    """Frames that are not new attempts leave the record alone: a SYN judged
    no-answer on retransmission, answers from the server, data packets."""
    try:
        dp.set_no_answer(1e-9)
        ingress_on(dp, syn4(seq=5))
        past_a_tick()
        ingress_on(dp, syn4(seq=5))  # now no_answer, still the same attempt
        synack = tcp(25, 40000, SYN | ACK, seq=777, ack=6)
        run_prog(dp.egress_fd, eth(ipv4("198.19.0.1", "198.18.0.11", synack), ETH_P_IP))
        ingress_on(dp, eth(ipv4("198.18.0.11", "198.19.0.1", tcp(40000, 25, ACK, seq=6)),
                           ETH_P_IP))
        ingress_on(dp, syn4(dport=80, seq=6))  # not an SMTP port
    finally:
        dp.set_no_answer(2.0)
    assert record(dp) == {"198.19.0.1": 1}
    ingress_on(dp, syn4(seq=7))  # a new ISN on the same 4-tuple is a new attempt
    assert record(dp) == {"198.19.0.1": 2}


def test_interfaces_are_kept_apart(dp: Datapath, other_ifindex: int) -> None:
    """Each interface's attempts land under its own ifindex: a VM's record is
    the sum over its own interfaces only (earliest first_ns, latest last_ns)."""
    send_plan(dp, LO)
    ingress_on(dp, syn4(dst="198.19.0.5", seq=10_000), other_ifindex)
    ingress_on(dp, syn4(dst="192.0.2.9", seq=10_001), other_ifindex)
    assert record(dp, other_ifindex) == {"198.19.0.5": 1, "192.0.2.9": 1}
    assert record(dp, LO) == PLAN
    assert record(dp, LO, other_ifindex) == {**PLAN, "198.19.0.5": 8, "192.0.2.9": 1}
    assert record(dp, 999_999) == {}
    assert recent.top_destinations(dp.table("smtp_recent"), []) == []

    def one(*ifx: int) -> recent.Destination:
        return next(d for d in recent.top_destinations(dp.table("smtp_recent"), ifx, None)
                    if d.address == "198.19.0.5")

    both, lo, other = one(LO, other_ifindex), one(LO), one(other_ifindex)
    assert (both.first_ns, both.last_ns) == (lo.first_ns, other.last_ns)


def test_forget_removes_only_the_given_interfaces(dp: Datapath, other_ifindex: int) -> None:
    """forget() deletes every entry of the interfaces it is given and nothing
    else, says how many it deleted, and a second call finds nothing."""
    send_plan(dp, LO)
    ingress_on(dp, syn4(dst="198.19.0.5", seq=10_000), other_ifindex)
    table = dp.table("smtp_recent")
    assert recent.forget(table, [other_ifindex]) == 1
    assert recent.forget(table, [other_ifindex, 999_999]) == 0
    assert record(dp, other_ifindex) == {}
    assert record(dp, LO) == PLAN
    assert recent.forget(table, []) == 0
    assert recent.forget(table, {LO}) == len(PLAN)
    assert len(table) == 0
    ingress_on(dp, syn4(dst="198.19.0.5", seq=20_000))  # starting afresh
    assert record(dp, LO) == {"198.19.0.5": 1}


def test_datapath_forget_includes_the_record(dp: Datapath, other_ifindex: int) -> None:
    """Forgetting a vanished interface (Datapath.forget, the agent's sweep)
    clears its record too, and no other interface's."""
    ingress_on(dp, syn4(dst="198.19.0.5", seq=1), LO)
    ingress_on(dp, syn4(dst="198.19.0.5", seq=2), other_ifindex)
    dp.forget({other_ifindex})
    assert record(dp, LO, other_ifindex) == {"198.19.0.5": 1}


def test_a_full_record_never_overcounts(dp: Datapath) -> None:
    """More destinations than the map holds: the LRU pushes entries out, but
    no address ever shows more attempts than it had, and counting goes on."""
    size = dp.sizes.recent
    n = size + size // 2
    sent: Counter[str] = Counter()
    for i in range(n):
        dst = f"198.19.{i // 250}.{i % 250 + 1}"
        for rep in range(1 + (i % 3 == 0)):  # every third address twice
            ingress_on(dp, syn4(dst=dst, seq=2 * i + rep))
            sent[dst] += 1
    got = record(dp)
    assert 0 < len(got) <= size
    assert all(got[a] <= sent[a] for a in got)
    assert stats_attempts(dp) == sum(sent.values())
    last = f"198.19.{(n - 1) // 250}.{(n - 1) % 250 + 1}"
    assert got.get(last) == sent[last]  # the newest entry is never the one pushed out


def test_upgrade_keeps_counts_and_adds_the_record() -> None:
    """An agent upgraded over a pinned build that had no smtp_recent recompiles,
    creates the map beside the old ones, keeps their counts, and drops the
    old build's programs (attached filters keep them alive until replaced)."""
    pin = Path(f"/sys/fs/bpf/smtpguard-test/upgrade-{uuid.uuid4().hex[:8]}")
    sizes = Sizes(max_stats=64, max_ifaces=8, conn_table=64, recent=64)
    old = Datapath(pin, sizes)
    try:
        old.load()
        old.set_ports(PORTS)
        run_prog(old.ingress_fd, syn4(seq=1))
        old.close()
        # What an older build leaves pinned: the maps it knew, and its
        # programs under its own tag.
        (pin / "smtp_recent").unlink()
        for prog in PROGRAMS:
            (current,) = pin.glob(f"{prog}_*")
            fd = obj_get(str(current))
            try:
                obj_pin(fd, str(pin / f"{prog}_0ldb0ld0ld0"))
            finally:
                os.close(fd)
            current.unlink()

        new = Datapath(pin, sizes)
        new.load()
        try:
            assert (pin / "smtp_recent").exists()
            assert not list(pin.glob("smtpg_*_0ldb0ld0ld0"))
            assert stats_attempts(new) == 1  # carried over
            assert {k.ifindex for k, _ in new.table("smtp_conns").items()} == {LO}
            run_prog(new.ingress_fd, syn4(seq=1))  # known attempt: a retransmission
            run_prog(new.ingress_fd, syn4(seq=2))
            assert stats_attempts(new) == 2
            assert record(new) == {"198.19.0.1": 1}
        finally:
            new.close()
    finally:
        old.close()
        shutil.rmtree(pin, ignore_errors=True)
