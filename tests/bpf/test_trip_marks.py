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


def mark_of(dp: Datapath, frame: bytes, mark: int = 0) -> int:
    """skb->mark after the ingress program ran on frame (from lo)."""
    buf = ctypes.create_string_buffer(frame, len(frame))
    ctx_in, ctx_out = _SkbHead(ifindex=LO, mark=mark), _SkbOut()
    attr = _TestAttr(prog_fd=dp.ingress_fd, data_size_in=len(frame),
                     data_in=ctypes.addressof(buf), repeat=1,
                     ctx_size_in=ctypes.sizeof(ctx_in), ctx_in=ctypes.addressof(ctx_in),
                     ctx_size_out=ctypes.sizeof(ctx_out), ctx_out=ctypes.addressof(ctx_out))
    bpf(PROG_TEST_RUN, attr)
    assert ctypes.c_int32(attr.retval).value == -1  # TC_ACT_UNSPEC: never a verdict
    return int(ctx_out.mark)


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
