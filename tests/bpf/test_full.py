"""Hash maps that fill up are never silent: the classifier counts every time
it had to skip, and the agent reads each map's fill next to it."""

from __future__ import annotations

import ctypes

from frames import syn4
from smtpguard.datapath import maps
from smtpguard.datapath.loader import Datapath
from smtpguard.datapath.testrun import test_run as run_prog


def full_count(dp: Datapath, name: str) -> int:
    return int(dp.table("smtp_full")[ctypes.c_uint32(maps.FULL_SLOTS[name])].value)


def test_a_full_stats_map_is_counted_and_reported(dp: Datapath) -> None:
    """With smtp_stats full, a new (interface, port) is not counted, and
    smtp_full says so; the fill level reads as full."""
    size = dp.sizes.max_stats
    stats = dp.table("smtp_stats")
    for i in range(size):
        stats[maps.SmtpKey(10_000 + i, 25)] = maps.SmtpStats()
    before = full_count(dp, "smtp_stats")
    run_prog(dp.ingress_fd, syn4(dport=587))  # ifindex 1: no entry yet, no room
    assert full_count(dp, "smtp_stats") == before + 1
    assert dp.fill()["smtp_stats"][:2] == (size, size)
    stats.clear()
    run_prog(dp.ingress_fd, syn4(dport=587, seq=2))
    assert full_count(dp, "smtp_stats") == before + 1  # room again: counted normally
    assert dp.fill()["smtp_stats"][0] == 1
