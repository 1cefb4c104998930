"""The destination sketch's time slots through the real classifier: the
first slots after boot count, slots of older epochs are reused, and slots
written by a classifier from before the live bit are still read."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator

import pytest

from frames import syn4
from smtpguard.datapath import distinct, maps
from smtpguard.datapath.loader import Datapath
from smtpguard.datapath.snapshot import take
from smtpguard.datapath.testrun import test_run as run_prog

COARSE_NS = 1 << maps.COARSE_SLOT_SHIFT
FINE_NS = 1 << maps.FINE_SLOT_SHIFT


def set_clock(dp: Datapath, coarse_epoch: int) -> None:
    """The slot clock put one second into a coarse epoch (and so into the
    first fine slot of it): the test has seconds before a slot turns over."""
    dp.set_slot_offset(-time.monotonic_ns() + coarse_epoch * COARSE_NS + 1_000_000_000)


@pytest.fixture
def boot(dp: Datapath) -> Iterator[Datapath]:
    """One second after boot: epoch 0 of both tiers."""
    set_clock(dp, 0)
    try:
        yield dp
    finally:
        dp.set_slot_offset(0)


@pytest.fixture
def later(dp: Datapath) -> Iterator[Datapath]:
    """Half an hour after boot (coarse epoch 7)."""
    set_clock(dp, 7)
    try:
        yield dp
    finally:
        dp.set_slot_offset(0)


def send(dp: Datapath, n: int, first: int = 0) -> distinct.Sketch:
    model = distinct.Sketch()
    for i in range(first, first + n):
        dst = f"198.19.{i // 200}.{i % 200 + 1}"
        assert run_prog(dp.ingress_fd, syn4(dst=dst, seq=i)).retval == -1
        distinct.add(model, distinct.addr_hash(maps.addr_bytes(dst)))
    return model


def sketch(dp: Datapath) -> maps.DestSketch:
    ((_, s),) = dp.table("smtp_dests").items()
    return s


def test_first_slots_after_boot_count(boot: Datapath) -> None:
    """Attempts in the first 4.6 minutes after boot (coarse epoch 0) and the
    first 8.6 s (fine epoch 0) are counted in both windows: epoch 0 is a
    written slot like any other, never taken for an empty one."""
    now = boot.slot_now()
    assert now >> maps.COARSE_SLOT_SHIFT == 0 and now >> maps.FINE_SLOT_SHIFT == 0
    model = send(boot, 150)
    s = sketch(boot)
    assert s.fine[0].epoch == s.coarse[0].epoch == maps.SLOT_LIVE
    assert maps.slot_epoch(s.fine[0].epoch) == 0
    assert all(maps.slot_epoch(x.epoch) is None for x in [*s.fine[1:], *s.coarse[1:]])
    (snap,) = take(boot.table("smtp_stats"), boot.table("smtp_dests"),
                   clock=boot.slot_now).ifaces.values()
    want = round(distinct.estimate(model), 1)
    assert snap.destinations == {"1m": want, "1h": want}
    assert abs(want - 150) <= 150 * 3 * 0.02


def test_a_slot_of_an_older_epoch_starts_empty(later: Datapath) -> None:
    """When the ring comes round to a slot, what it held for an epoch 16
    coarse slots ago (73 min) is cleared before the new attempt is added."""
    send(later, 1)
    cur = later.slot_now() >> maps.COARSE_SLOT_SHIFT
    ((k, sk),) = later.table("smtp_dests").items()
    old = sk.coarse[cur % maps.COARSE_SLOTS]
    old.epoch = (cur - maps.COARSE_SLOTS) | maps.SLOT_LIVE
    ctypes.memset(ctypes.addressof(old.bits), 0xFF, ctypes.sizeof(old.bits))
    later.table("smtp_dests")[k] = sk
    model = send(later, 1, first=7)
    slot = sketch(later).coarse[cur % maps.COARSE_SLOTS]
    assert slot.epoch == cur | maps.SLOT_LIVE
    assert distinct.from_slot(slot).bits == model.bits


def test_slots_from_before_the_live_bit_are_read_and_kept(later: Datapath) -> None:
    """A map pinned by an older classifier holds bare epochs: readers take
    them as the epochs they are, and a new attempt in the same epoch adds to
    the slot (tagging it) instead of wiping it."""
    first = send(later, 40)
    ((k, sk),) = later.table("smtp_dests").items()
    for slot in [*sk.fine, *sk.coarse]:
        slot.epoch &= ~maps.SLOT_LIVE  # as the old classifier wrote them
    later.table("smtp_dests")[k] = sk
    (snap,) = take(later.table("smtp_stats"), later.table("smtp_dests"),
                   clock=later.slot_now).ifaces.values()
    want = round(distinct.estimate(first), 1)
    assert snap.destinations == {"1m": want, "1h": want}
    more = send(later, 40, first=40)
    cur = later.slot_now() >> maps.COARSE_SLOT_SHIFT
    slot = sketch(later).coarse[cur % maps.COARSE_SLOTS]
    assert slot.epoch == cur | maps.SLOT_LIVE
    assert distinct.from_slot(slot).bits == distinct.merge([first, more]).bits
