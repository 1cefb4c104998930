"""What a host watches in etcd (fleet/interest.py), on an in-memory etcd
(pure logic): each key read once and watched from the revision after; no
event lost or delivered twice when the stream breaks and every watch resumes;
a compacted key read again, alone; etcd away costs retries, never what is
wanted."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest

from smtpguard.fleet.etcd import EtcdCompacted, EtcdError, Kv
from smtpguard.fleet.etcdgrpc import GrpcEtcd
from smtpguard.fleet.interest import Interest

A, B, C, D = (f"/sg/vms/{vm}" for vm in ("a", "b", "c", "d"))
T1 = "/sg/tenants/t1/"


@dataclass(eq=False)
class Watch:
    key: str
    prefix: bool
    start: int
    on_event: Callable[[str, Kv], None]
    on_end: Callable[[EtcdError], None]
    open: bool = True

    def covers(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


class FakeEtcd:
    """GrpcEtcd in memory: a store with its revision and history, every read
    and watch recorded. A change reaches the open watches as it is made,
    unless held (in flight when the stream breaks); a watch opened replays the
    history from its start revision, or ends compacted."""

    def __init__(self) -> None:
        self.rev = 1
        self.data: dict[str, Kv] = {}
        self.history: list[tuple[str, Kv]] = []
        self.compacted = 0  # revisions before this one are gone
        self.reads: list[tuple[str, bool]] = []
        self.watches: list[Watch] = []  # every one opened, in order
        self.cancelled: list[Watch] = []
        self.down = False  # every call raises EtcdError
        self.failing: set[str] = set()  # keys whose reads raise EtcdError
        self.hold = False  # changes stay in flight
        self.tries = 0  # reads and watches asked for, failed ones included
        self.closed = False

    # -- the store ---------------------------------------------------------------
    def put(self, key: str, value: str) -> Kv:
        self.rev += 1
        kv = Kv(key, value.encode(), self.rev, 0)
        self.data[key] = kv
        self._change("PUT", kv)
        return kv

    def delete(self, key: str) -> Kv:
        self.rev += 1
        del self.data[key]
        kv = Kv(key, b"", self.rev, 0)
        self._change("DELETE", kv)
        return kv

    def _change(self, kind: str, kv: Kv) -> None:
        self.history.append((kind, kv))
        if not self.hold:
            for w in self.open():
                if w.covers(kv.key):
                    w.on_event(kind, kv)

    def compact(self) -> None:
        self.compacted = self.rev

    def open(self, key: str | None = None) -> list[Watch]:
        return [w for w in self.watches if w.open and key in (None, w.key)]

    def watch_of(self, key: str) -> Watch:
        (w,) = self.open(key)
        return w

    def end(self, w: Watch, exc: EtcdError) -> None:
        w.open = False
        w.on_end(exc)

    def break_stream(self) -> None:
        """The stream fails: every open watch ends, what was in flight is lost."""
        self.hold = False
        for w in self.open():
            self.end(w, EtcdError("etcd watch ended: stream reset"))

    # -- GrpcEtcd ----------------------------------------------------------------
    def _call(self, what: str) -> None:
        self.tries += 1
        if self.down:
            raise EtcdError(f"etcd {what}: connection refused")

    def read(self, key: str, prefix: bool = False, timeout: float | None = None,
             wait: bool = False) -> tuple[int, list[Kv]]:
        self._call("read")
        if key in self.failing:
            raise EtcdError("etcd read: timed out")
        self.reads.append((key, prefix))
        return self.rev, [kv for k, kv in sorted(self.data.items())
                          if (k.startswith(key) if prefix else k == key)]

    def watch(self, key: str, prefix: bool, start_revision: int,
              on_event: Callable[[str, Kv], None],
              on_end: Callable[[EtcdError], None]) -> Any:
        self._call("watch")
        w = Watch(key, prefix, start_revision, on_event, on_end)
        self.watches.append(w)
        if start_revision < self.compacted:
            self.end(w, EtcdCompacted(self.compacted))
            return w
        for kind, kv in self.history:
            if kv.mod_revision >= start_revision and w.covers(kv.key):
                on_event(kind, kv)
        return w

    def cancel(self, handle: Any) -> None:
        handle.open = False
        self.cancelled.append(handle)

    def close(self) -> None:
        self.closed = True
        for w in self.open():
            w.open = False


class Log:
    """The structlog calls made, as (level, event)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **kw: self.lines.append((level, event))


def interest(*initial: tuple[str, str]) -> tuple[FakeEtcd, Interest, list[Kv], Log]:
    etcd = FakeEtcd()
    for key, value in initial:
        etcd.put(key, value)
    got: list[Kv] = []
    log = Log()
    return etcd, Interest(cast(GrpcEtcd, etcd), got.append, log), got, log


def values(got: list[Kv]) -> list[tuple[str, str]]:
    return [(kv.key, kv.value.decode()) for kv in got]


def starts(etcd: FakeEtcd) -> dict[str, int]:
    """Each open watch's key and start revision."""
    out: dict[str, int] = {}
    for w in etcd.open():
        assert w.key not in out, f"two open watches on {w.key}"
        out[w.key] = w.start
    return out


def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


# -- reading and watching ---------------------------------------------------------
def test_each_key_is_read_once_and_watched_from_the_next_revision() -> None:
    """A wanted key is read once, its value handed over, then watched from the
    read's revision + 1; streaming only once every wanted key is watched."""
    etcd, it, got, _ = interest((A, "a1"), ("/sg/vms/other", "x"))
    assert it.streaming  # nothing wanted yet
    it.set("vms", {A: False, B: False})
    assert not it.streaming
    it._reconcile()
    assert etcd.reads == [(A, False), (B, False)] and it.reads == 2
    assert starts(etcd) == {A: 4, B: 4}  # the store stood at revision 3
    assert values(got) == [(A, "a1")]
    assert it.streaming
    it._reconcile()  # nothing changed: no read, no watch
    assert len(etcd.reads) == 2 and len(etcd.watches) == 2 and not etcd.cancelled


def test_streaming_waits_for_every_key() -> None:
    """One key watched and another not yet (its read failed) is not streaming."""
    etcd, it, _, _ = interest((A, "a1"))
    it.set("vms", {A: False, B: False})
    etcd.failing = {B}
    with pytest.raises(EtcdError):
        it._reconcile()
    assert list(starts(etcd)) == [A] and not it.streaming
    etcd.failing = set()
    it._reconcile()
    assert list(starts(etcd)) == [A, B] and it.streaming
    assert etcd.reads == [(A, False), (B, False)]  # A not read again


def test_prefixes_are_read_and_watched_as_prefixes() -> None:
    """A tenant's prefix brings every key under it and none beside it."""
    etcd, it, got, _ = interest((T1 + "hv1", "3"), ("/sg/tenants/t10/hv1", "9"))
    it.set("tenants", {T1: True})
    it._reconcile()
    assert etcd.reads == [(T1, True)]
    (w,) = etcd.open()
    assert (w.key, w.prefix, w.start) == (T1, True, 4)
    etcd.put(T1 + "hv2", "5")
    etcd.put("/sg/tenants/t10/hv2", "1")
    etcd.put(T1 + "hv1", "4")
    assert values(got) == [(T1 + "hv1", "3"), (T1 + "hv2", "5"), (T1 + "hv1", "4")]
    etcd.break_stream()
    it._reconcile()
    assert starts(etcd) == {T1: 7} and len(etcd.reads) == 1  # after hv1's 6


# -- events -----------------------------------------------------------------------
def test_a_put_is_handed_over_a_delete_only_advances_the_revision() -> None:
    """A PUT reaches on_kv and advances the key's revision; a DELETE (a lease
    run out) advances it only."""
    etcd, it, got, _ = interest((A, "a1"))
    it.set("vms", {A: False})
    it._reconcile()
    got.clear()
    put = etcd.put(A, "a2")
    assert got == [put] and it.upto[A] == put.mod_revision and it.events == 1
    gone = etcd.delete(A)
    assert got == [put] and it.upto[A] == gone.mod_revision and it.events == 2
    etcd.break_stream()
    it._reconcile()
    assert starts(etcd) == {A: gone.mod_revision + 1}


def test_a_replaced_watchs_late_events_are_ignored() -> None:
    """Events still coming on a watch cancelled (key dropped), replaced after
    the stream broke, or replaced after a compaction change nothing."""
    etcd, it, got, _ = interest((A, "a1"), (B, "b1"), (C, "c1"))
    it.set("vms", {A: False, B: False, C: False})
    it._reconcile()
    old = {k: etcd.watch_of(k) for k in (A, B, C)}
    it.set("vms", {B: False, C: False})
    it._reconcile()  # A dropped
    etcd.end(old[B], EtcdError("etcd watch ended: reset"))
    etcd.compact()
    etcd.end(old[C], EtcdCompacted(etcd.compacted))
    it._reconcile()  # B resumed, C read again
    assert old[A] in etcd.cancelled and etcd.open(B) and etcd.open(C)
    got.clear()
    upto, events = dict(it.upto), it.events
    for key, w in old.items():
        w.on_event("PUT", Kv(key, b"late", 99, 0))
        w.on_event("DELETE", Kv(key, b"", 100, 0))
    assert got == [] and it.upto == upto and it.events == events
    for w in old.values():
        w.on_end(EtcdError("etcd watch ended: late"))  # nor does their end
    assert it.streaming


# -- what is wanted changes -------------------------------------------------------
def test_dropped_keys_are_cancelled_and_forgotten_added_ones_watched_alone() -> None:
    """Dropping keys cancels exactly their watches and forgets their revisions
    (back again: read again); adding one reads and watches that one only."""
    etcd, it, _, _ = interest((A, "a1"), (B, "b1"), (C, "c1"))
    it.set("vms", {A: False, B: False, C: False})
    it.set("tenants", {T1: True})
    it._reconcile()
    before = {k: etcd.watch_of(k) for k in (A, B, C, T1)}
    it.set("vms", {A: False, C: False})
    it._reconcile()
    assert etcd.cancelled == [before[B]]
    assert B not in it.upto and B not in it.active and set(it.upto) == {A, C, T1}
    assert it.wanted() == {A: False, C: False, T1: True} and it.streaming
    reads = len(etcd.reads)
    etcd.put(D, "d1")
    it.set("vms", {A: False, C: False, D: False})
    it._reconcile()
    assert etcd.reads[reads:] == [(D, False)] and etcd.cancelled == [before[B]]
    assert {k: etcd.watch_of(k) for k in (A, C, T1)} == {k: before[k] for k in (A, C, T1)}
    it.set("vms", {A: False, B: False, C: False, D: False})
    it._reconcile()
    assert etcd.reads[reads:] == [(D, False), (B, False)]  # forgotten: read again
    it.set("vms", {})
    it._reconcile()
    assert starts(etcd) == {T1: before[T1].start} and set(it.upto) == {T1}


# -- the stream breaks --------------------------------------------------------------
def test_a_broken_stream_resumes_every_watch_without_a_read_and_loses_nothing() -> None:
    """The stream ends (etcd restarted): every watch resumes from its last known
    revision + 1, nothing read again; changes in flight and made meanwhile are
    replayed, each handed over exactly once."""
    etcd, it, got, _ = interest((A, "a1"), (B, "b1"), (T1 + "hv1", "1"))
    it.set("vms", {A: False, B: False})
    it.set("tenants", {T1: True})
    it._reconcile()
    assert starts(etcd) == {A: 5, B: 5, T1: 5}
    etcd.put(A, "a2")  # 5, delivered
    etcd.put(T1 + "hv2", "1")  # 6, delivered
    etcd.hold = True
    etcd.put(A, "a3")  # 7, in flight when the stream breaks
    reads, upto = list(etcd.reads), dict(it.upto)
    etcd.break_stream()
    assert not it.streaming and it.upto == upto
    etcd.put(B, "b2")  # 8, while no watch is open
    etcd.put(T1 + "hv1", "2")  # 9
    etcd.put("/sg/vms/other", "x")  # 10
    it._reconcile()
    assert starts(etcd) == {A: 6, B: 5, T1: 7}
    assert etcd.reads == reads and it.reads == 3
    assert it.streaming
    etcd.put(B, "b3")  # 11, on the new watch
    assert values(got) == [
        (A, "a1"), (B, "b1"), (T1 + "hv1", "1"),  # the reads
        (A, "a2"), (T1 + "hv2", "1"),
        (A, "a3"), (B, "b2"), (T1 + "hv1", "2"),  # replayed
        (B, "b3")]
    assert it.upto == {A: 7, B: 11, T1: 9}


def test_one_watch_ending_resumes_them_all() -> None:
    """One watch's end on the stream's failure cancels the others and resumes
    every one from its own revision."""
    etcd, it, got, _ = interest((A, "a1"), (B, "b1"))
    it.set("vms", {A: False, B: False})
    it._reconcile()
    old_b = etcd.watch_of(B)
    etcd.put(B, "b2")  # 4
    etcd.end(etcd.watch_of(A), EtcdError("etcd watch ended: reset"))
    assert not it.streaming
    it._reconcile()
    assert etcd.cancelled == [old_b] and starts(etcd) == {A: 4, B: 5}
    assert len(etcd.reads) == 2 and values(got) == [(A, "a1"), (B, "b1"), (B, "b2")]
    it.set("vms", {B: False})
    etcd.end(etcd.watch_of(A), EtcdError("etcd watch ended: reset"))  # dropped, not yet let go
    assert not it.streaming  # B is on the broken stream too
    it._reconcile()
    assert starts(etcd) == {B: 5} and A not in it.upto and it.streaming
    assert len(etcd.reads) == 2


def test_a_resume_behind_a_compaction_reads_that_key_again() -> None:
    """A watch resumed from a revision compacted away meanwhile is read whole
    and watched from the new read; the others resume without a read."""
    etcd, it, got, log = interest((A, "a1"), (B, "b1"))
    it.set("vms", {A: False, B: False})
    it._reconcile()
    etcd.put(A, "a2")  # 4
    etcd.put(B, "b2")  # 5
    etcd.hold = True
    etcd.put(A, "a3")  # 6, in flight
    etcd.break_stream()
    etcd.compact()  # history starts at 6: A's resume from 5 is gone, B's from 6 is not
    it._reconcile()
    assert not it.streaming and starts(etcd) == {B: 6}
    it._reconcile()
    assert etcd.reads == [(A, False), (B, False), (A, False)]
    assert starts(etcd) == {A: 7, B: 6} and it.streaming
    assert values(got)[-1] == (A, "a3")
    assert ("warning", "fleet.watch_compacted") in log.lines


# -- compaction -------------------------------------------------------------------
def test_a_compacted_watch_reads_its_key_again_and_only_it() -> None:
    """A watch ended on a compacted revision reads its key again, whole, and
    watches from that read's revision; the other watches stay as they are."""
    etcd, it, got, log = interest((A, "a1"), (T1 + "hv1", "1"), (B, "b1"))
    it.set("vms", {A: False, B: False})
    it.set("tenants", {T1: True})
    it._reconcile()
    others = [etcd.watch_of(A), etcd.watch_of(B)]
    etcd.put(T1 + "hv2", "1")  # 5
    etcd.compact()
    etcd.end(etcd.watch_of(T1), EtcdCompacted(etcd.compacted))
    assert ("warning", "fleet.watch_compacted") in log.lines
    assert not it.streaming and T1 not in it.upto
    got.clear()
    it._reconcile()
    assert etcd.reads[3:] == [(T1, True)] and not etcd.cancelled
    assert etcd.open() == [*others, etcd.watch_of(T1)]
    assert starts(etcd) == {A: 5, B: 5, T1: 6}
    assert values(got) == [(T1 + "hv1", "1"), (T1 + "hv2", "1")]
    assert it.streaming


# -- an arrival's read ----------------------------------------------------------------
def test_read_now_starts_the_keys_watch_after_it() -> None:
    """An arriving VM's key read now: its kvs returned, and its watch, once
    wanted, starts after that read (not read again), so a change since comes
    on the watch."""
    etcd, it, got, _ = interest((A, "a1"), (B, "b1"))
    assert it.read_now(A, 0.5) == [etcd.data[A]]
    assert etcd.reads == [(A, False)] and it.reads == 1
    etcd.put(A, "a2")  # 4
    etcd.put(B, "b2")  # 5
    it.set("vms", {A: False, B: False})
    it._reconcile()
    assert etcd.reads == [(A, False), (B, False)]
    assert starts(etcd) == {A: 4, B: 6}
    assert values(got) == [(A, "a2"), (B, "b2")]  # A's watch, then B's read
    assert it.read_now("/sg/vms/none", 0.5) == []


def test_read_now_of_a_watched_key_leaves_its_watch_alone() -> None:
    """Reading a watched key does not move its revision: a change still in
    flight on the stream is replayed when the watch resumes."""
    etcd, it, got, _ = interest((A, "a1"))
    it.set("vms", {A: False})
    it._reconcile()
    etcd.hold = True
    etcd.put(A, "a2")  # 3, in flight
    assert values(it.read_now(A, 0.5)) == [(A, "a2")]
    assert it.upto[A] == 2
    etcd.break_stream()
    it._reconcile()
    assert starts(etcd) == {A: 3} and values(got) == [(A, "a1"), (A, "a2")]


def test_read_now_survives_a_reconcile_before_the_key_is_wanted() -> None:
    """An arrival reads its key, then the agent wants it (FleetLink.arrive:
    fetch, then want); the interest thread may reconcile in between (woken by
    another group's change, or its 5 s timer). The key's watch must still
    start after the arrival's read, without reading it again."""
    etcd, it, _, _ = interest((A, "a1"))
    it.read_now(A, 0.5)
    it.set("tenants", {T1: True})
    it._reconcile()
    it.set("vms", {A: False})
    it._reconcile()
    assert etcd.reads == [(A, False), (T1, True)]
    assert starts(etcd) == {T1: 3, A: 3}


# -- etcd away ----------------------------------------------------------------------
def test_etcd_down_raises_and_forgets_nothing() -> None:
    """With etcd down a reconcile raises EtcdError and keeps what is wanted and
    known; once it is back the next one completes, resuming without a read."""
    etcd, it, got, _ = interest((A, "a1"), (B, "b1"))
    etcd.down = True
    it.set("vms", {A: False})
    with pytest.raises(EtcdError):
        it._reconcile()
    assert it.wanted() == {A: False} and not it.streaming and not etcd.open()
    with pytest.raises(EtcdError):
        it.read_now(B, 0.5)
    etcd.down = False
    it._reconcile()
    assert it.streaming and starts(etcd) == {A: 4} and values(got) == [(A, "a1")]

    it.set("vms", {A: False, B: False})
    it._reconcile()
    etcd.put(A, "a2")  # 4
    etcd.break_stream()
    etcd.down = True
    etcd.put(B, "b2")  # 5
    with pytest.raises(EtcdError):
        it._reconcile()
    assert it.wanted() == {A: False, B: False} and it.upto == {A: 4, B: 3}
    assert not it.streaming
    etcd.down = False
    it._reconcile()
    assert starts(etcd) == {A: 5, B: 4} and it.streaming
    assert etcd.reads == [(A, False), (B, False)]
    assert values(got) == [(A, "a1"), (B, "b1"), (A, "a2"), (B, "b2")]


def test_the_thread_retries_until_etcd_is_back() -> None:
    """Started while etcd is down, the thread backs off and retries, and
    streams once etcd answers; stop() closes the client."""
    etcd, it, got, log = interest((A, "a1"))
    etcd.down = True
    it.set("vms", {A: False})
    it.start()
    try:
        until(lambda: etcd.tries >= 2)  # failed, waited, tried again
        assert not it.streaming and ("debug", "fleet.interest_failed") in log.lines
        etcd.down = False
        until(lambda: it.streaming)
        assert starts(etcd) == {A: 3} and values(got) == [(A, "a1")]
        etcd.put(A, "a2")
        until(lambda: len(got) == 2)
    finally:
        it.stop()
    assert etcd.closed and etcd.reads == [(A, False)]
