from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpguard.datapath.loader import Datapath, Sizes, ensure_bpffs

PORTS = (25, 465, 587, 2525)
# The classifier stamps attempts with the coarse clock: CLOCK_MONOTONIC as of
# the last tick.
CLOCK_MONOTONIC_COARSE = 6


def coarse_ns() -> int:
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def past_a_tick() -> None:
    """Return once the classifier's clock has moved on."""
    t0 = coarse_ns()
    while coarse_ns() == t0:
        time.sleep(0.001)


def clear(dp: Datapath) -> None:
    for name in ("smtp_stats", "smtp_conns", "smtp_dests", "smtp_recent"):
        dp.table(name).clear()


@pytest.fixture(scope="session")
def loaded() -> Iterator[Datapath]:
    ensure_bpffs(Path("/sys/fs/bpf"))
    dp = Datapath(Path(f"/sys/fs/bpf/smtpguard-test/bpf-{uuid.uuid4().hex[:8]}"),
                  Sizes(max_stats=1024, max_ifaces=64, conn_table=1024, recent=1024))
    try:
        dp.load()
        dp.set_ports(PORTS)
        dp.set_no_answer(2.0)
        yield dp
    finally:
        dp.close()
        dp.unpin()


@pytest.fixture
def dp(loaded: Datapath) -> Datapath:
    clear(loaded)
    return loaded
