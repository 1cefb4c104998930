"""The fleet's reads are a watch, not polling (a real etcd; FleetSync, the
agent's fleet thread, running where etcd's network is): changes arrive
without a single range request while nothing changes, the watch resumes
after etcd restarts, and a compacted revision is read again in full."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fleetkit import URL, EtcdKit

from conftest import require_root, unique
from smtpguard.daemon.netns import run_in
from smtpguard.fleet.etcd import Etcd, EtcdCompacted
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import FleetSync
from smtpguard.policy.model import Fleet as FleetPolicy


@pytest.fixture
def kit() -> Iterator[EtcdKit]:
    require_root()
    k = EtcdKit(unique("sgw"))
    try:
        k.up()
        yield k
    finally:
        k.down()


def ranges(kit: EtcdKit) -> float:
    """etcd's own count of Range calls handled (the JSON gateway's included)."""
    def fetch() -> str:
        with urllib.request.urlopen(f"{URL}/metrics", timeout=5) as r:
            return r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in run_in(kit.ns, fetch).splitlines()
               if line.startswith("grpc_server_handled_total{")
               and 'grpc_method="Range"' in line)


class Host:
    """One FleetSync, its threads started inside etcd's namespace."""

    def __init__(self, kit: EtcdKit, name: str) -> None:
        self.got: list[FleetRecord] = []
        cfg = FleetPolicy(endpoints=(URL,), prefix=kit.prefix, host=name)
        self.sync = run_in(kit.ns, lambda: FleetSync(cfg, self.got.append, [], host=name))
        run_in(kit.ns, self.sync.start)  # threads made there stay there

    def has(self, vm: str, timeout: float = 15) -> FleetRecord:
        return wait(lambda: next((r for r in reversed(self.got) if r.vm == vm), None), timeout)


def wait(fn: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_changes_arrive_on_the_watch_and_idle_hosts_send_no_reads(kit: EtcdKit) -> None:
    a, b = Host(kit, "hostA"), Host(kit, "hostB")
    try:
        wait(lambda: a.sync.watching and b.sync.watching)
        before = ranges(kit)
        a.sync.publish(FleetRecord("vm1", "hostA", state="blocked", since=time.time()))
        assert b.has("vm1").state == "blocked"
        time.sleep(3)  # six of the old polling passes per host
        assert ranges(kit) == before  # nothing was polled: the watch brought it
        # etcd restarts: the watch ends, the hosts poll meanwhile, then watch again
        # from the revision they had, and what was written since arrives.
        kit.stop()
        wait(lambda: not a.sync.watching and not b.sync.watching)
        kit.start()
        wait(lambda: a.sync.watching and b.sync.watching, timeout=30)
        a.sync.publish(FleetRecord("vm2", "hostA", state="throttled", since=time.time()))
        assert b.has("vm2").state == "throttled"
    finally:
        a.sync.stop()
        b.sync.stop()


def test_a_compacted_revision_is_read_again_in_full(kit: EtcdKit) -> None:
    """A watch from a revision etcd compacted away fails as such (never
    silently), and a host whose watch fell that far behind reads everything."""
    a, b = Host(kit, "hostA"), Host(kit, "hostB")
    try:
        wait(lambda: a.sync.watching and b.sync.watching)
        for i in range(5):
            a.sync.publish(FleetRecord(f"vm{i}", "hostA", since=time.time()))
        b.has("vm4")
        etcd = run_in(kit.ns, lambda: Etcd(FleetPolicy(endpoints=(URL,), prefix=kit.prefix)))
        rev = run_in(kit.ns, lambda: etcd.range(f"{kit.prefix}/")[0])
        kit._post("/kv/compaction", {"revision": rev, "physical": True})
        with pytest.raises(EtcdCompacted):
            run_in(kit.ns, lambda: etcd.watch(f"{kit.prefix}/", 2, lambda *_: None,
                                              lambda: None, threading.Event(), 5))
        b.sync.stop()  # B away; A writes; B comes back believing it is at revision 2
        a.sync.publish(FleetRecord("vm9", "hostA", state="blocked", since=time.time()))
        wait(lambda: kit.get(f"{kit.prefix}/vms/vm9"))
        late = Host(kit, "hostB")
        wait(lambda: late.sync.watching)
        # As if it had last read at revision 2 and seen nothing since.
        with late.sync._read_lock:
            late.sync.rev = 2
            late.sync.seen.clear()
            late.got.clear()
        late.sync.etcd.close_watches()  # its watch resumes from revision 3: compacted
        assert late.has("vm9").state == "blocked"  # the full read brought it
        wait(lambda: late.sync.watching and late.sync.rev > rev)
        assert late.sync.etcd.errors["watch"] >= 1
        late.sync.stop()
    finally:
        a.sync.stop()
        b.sync.stop()
