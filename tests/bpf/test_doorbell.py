"""The doorbell: the classifier rings when counts change that detection
reads (a new attempt, an answer), and only then; the agent answers before it
reads, so no change goes unnoticed."""

from __future__ import annotations

import frames as f
from smtpguard.datapath.loader import Datapath
from smtpguard.datapath.testrun import test_run as run_prog


def test_a_new_attempt_rings_and_a_retransmission_does_not(dp: Datapath) -> None:
    bell = dp.doorbell()
    try:
        bell.rung()
        assert not bell.rung()
        run_prog(dp.ingress_fd, f.syn4(seq=100))
        assert bell.rung()
        assert not bell.rung()  # answered
        run_prog(dp.ingress_fd, f.syn4(seq=100))  # the same attempt again
        assert not bell.rung()
        non_smtp = f.eth(f.ipv4("198.18.0.11", "198.19.0.1", f.tcp(40000, 443, f.SYN)),
                         f.ETH_P_IP)
        run_prog(dp.ingress_fd, non_smtp)
        assert not bell.rung()
        run_prog(dp.egress_fd, f.answer(f.RST | f.ACK, 100))  # a failed handshake
        assert bell.rung()
        run_prog(dp.ingress_fd, f.syn4(seq=200))
        run_prog(dp.ingress_fd, f.syn4(seq=300))
        assert bell.rung() and not bell.rung()  # two changes, one ring
    finally:
        bell.close()


def test_the_ring_wakes_a_sleeper_once_per_ring(dp: Datapath) -> None:
    """A record per 0 -> 1 of the word: the agent sleeps on the ring, wakes
    on a new attempt, and is not woken again until it answered."""
    bell = dp.doorbell()
    try:
        bell.rung()
        while bell.wait(0.01):  # what earlier tests left
            pass
        assert not bell.wait(0.05)
        run_prog(dp.ingress_fd, f.syn4(seq=400))
        assert bell.wait(1.0)
        run_prog(dp.ingress_fd, f.syn4(seq=401))  # the word is still set: no record
        assert not bell.wait(0.05)
        assert bell.rung()
        run_prog(dp.ingress_fd, f.syn4(seq=402))
        assert bell.wait(1.0)
    finally:
        bell.close()
