"""The trip wire (datapath/trip.py) through the real classifier: the
crossing attempt passes, every SYN after it carries the mark, and nothing
changes for an interface that is not armed."""

from __future__ import annotations

import ctypes

from test_recent import LO, _SkbHead

from frames import syn4, syn6
from smtpguard.datapath import trip
from smtpguard.datapath.bpfsys import PROG_TEST_RUN, bpf
from smtpguard.datapath.loader import Datapath
from smtpguard.datapath.testrun import _TestAttr

MARK = 0x04000000


class _SkbOut(ctypes.Structure):
    # The kernel hands back the whole struct __sk_buff (ENOSPC if it does not fit).
    _fields_ = [("head", _SkbHead), ("_rest", ctypes.c_uint8 * 256)]

    @property
    def mark(self) -> int:
        return int(self.head.mark)


TC_ACT_UNSPEC, TC_ACT_SHOT = -1, 2


def run_vm_side(dp: Datapath, frame: bytes, mark: int = 0, egress: bool = False
                ) -> tuple[int, int]:
    """(verdict, skb->mark) after the VM-side program ran on frame on lo: as
    received there (its tc ingress), or, egress, as sent through lo's
    transmit path (a macvtap's guest: never received, skb_iif 0)."""
    buf = ctypes.create_string_buffer(frame, len(frame))
    ctx_in = _SkbHead(ifindex=LO, ingress_ifindex=0 if egress else LO, mark=mark)
    ctx_out = _SkbOut()
    attr = _TestAttr(prog_fd=dp.ingress_fd, data_size_in=len(frame),
                     data_in=ctypes.addressof(buf), repeat=1,
                     ctx_size_in=ctypes.sizeof(ctx_in), ctx_in=ctypes.addressof(ctx_in),
                     ctx_size_out=ctypes.sizeof(ctx_out), ctx_out=ctypes.addressof(ctx_out))
    bpf(PROG_TEST_RUN, attr)
    return ctypes.c_int32(attr.retval).value, int(ctx_out.mark)


def mark_of(dp: Datapath, frame: bytes, mark: int = 0) -> int:
    """skb->mark after the ingress program ran on frame (from lo)."""
    verdict, out = run_vm_side(dp, frame, mark)
    assert verdict == TC_ACT_UNSPEC  # at ingress never a verdict: the tables judge
    return out


def attempts(dp: Datapath) -> int:
    return sum(v.attempts for _, v in dp.table("smtp_stats").items())


def test_the_crossing_attempt_passes_and_every_syn_after_it_is_marked(dp: Datapath) -> None:
    dp.set_trip_mark(MARK)
    table = dp.table("smtp_trip")
    try:
        trip.arm(table, LO, 3)
        trip.arm(table, 999_999, 3)  # another interface's, never reached
        assert trip.census(table) == (2, 0)
        marks = [mark_of(dp, syn4(seq=s)) for s in range(1, 6)]
        assert marks == [0, 0, 0, MARK, MARK]
        assert trip.left(table, LO) == 0
        assert trip.census(table) == (1, 1)  # armed, tripped (smtpguard_trip_wires)
        trip.disarm(table, 999_999)
        assert mark_of(dp, syn4(seq=1)) == MARK  # a retransmission, once tripped
        assert mark_of(dp, syn6(seq=9)) == MARK  # every family, every SMTP port
        assert mark_of(dp, syn4(seq=10, dport=587), mark=0x1) == MARK | 0x1  # others' bits kept
        assert mark_of(dp, syn4(seq=11, dport=80)) == 0  # not SMTP: untouched
        assert attempts(dp) == 7  # counted as ever (the retransmission is none)
        trip.disarm(table, LO)
        assert trip.left(table, LO) is None
        assert trip.census(table) == (0, 0)
        assert mark_of(dp, syn4(seq=12)) == 0
    finally:
        trip.disarm(table, LO)
        trip.disarm(table, 999_999)
        dp.set_trip_mark(0)


def test_without_a_mark_configured_nothing_is_marked(dp: Datapath) -> None:
    table = dp.table("smtp_trip")
    try:
        trip.arm(table, LO, 1)
        assert [mark_of(dp, syn4(seq=s)) for s in range(1, 4)] == [0, 0, 0]
        assert trip.left(table, LO) == 0  # tripped all the same
    finally:
        trip.disarm(table, LO)


def test_at_a_macvtaps_egress_what_the_table_marked_is_counted_then_dropped(
        dp: Datapath) -> None:
    """Where the VM sends through the device's transmit path (a macvtap),
    netfilter's egress table runs first and marks the SYNs it refuses: the
    classifier counts each as an attempt (a retransmission as one), then
    drops it. Unmarked SYNs and other packets pass; at ingress a marked SYN
    passes on to the tables as before."""
    dp.set_trip_mark(MARK)
    try:
        before = attempts(dp)
        assert run_vm_side(dp, syn4(seq=21), MARK, egress=True)[0] == TC_ACT_SHOT
        assert run_vm_side(dp, syn4(seq=21), MARK, egress=True)[0] == TC_ACT_SHOT
        assert run_vm_side(dp, syn6(seq=22), MARK | 0x1, egress=True)[0] == TC_ACT_SHOT
        assert attempts(dp) == before + 2  # the retransmission is none
        assert run_vm_side(dp, syn4(seq=23), 0, egress=True) == (TC_ACT_UNSPEC, 0)
        assert run_vm_side(dp, syn4(seq=24), 0x1, egress=True) == (TC_ACT_UNSPEC, 0x1)
        assert run_vm_side(dp, syn4(seq=25, dport=80), MARK, egress=True)[0] == TC_ACT_UNSPEC
        assert run_vm_side(dp, syn4(seq=26), MARK) == (TC_ACT_UNSPEC, MARK)
    finally:
        dp.set_trip_mark(0)
    # Without a mark configured nothing is dropped, whatever the bits.
    assert run_vm_side(dp, syn4(seq=27), MARK, egress=True)[0] == TC_ACT_UNSPEC


def test_a_wire_tripped_at_a_macvtaps_egress_stops_the_syn_itself(dp: Datapath) -> None:
    """No table comes after the classifier on a device's egress: once its
    wire trips, the classifier drops the VM's SYNs itself."""
    dp.set_trip_mark(MARK)
    table = dp.table("smtp_trip")
    try:
        trip.arm(table, LO, 2)
        got = [run_vm_side(dp, syn4(seq=s), egress=True) for s in range(31, 35)]
        assert got == [(TC_ACT_UNSPEC, 0), (TC_ACT_UNSPEC, 0), (TC_ACT_SHOT, MARK),
                       (TC_ACT_SHOT, MARK)]
    finally:
        trip.disarm(table, LO)
        dp.set_trip_mark(0)
