"""The fleet's reads are watches of what concerns each host, not polling
and not the whole fleet (a real etcd; FleetSync, the agent's fleet thread,
running where etcd's network is): a host hears the records of the VMs it runs
and no other, the counts of the tenants it hosts and no other, without a
single range request while nothing changes; the watches resume after etcd
restarts, and a compacted revision is read again, so every host still has
exactly the records of its VMs."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fleetkit import EtcdKit, wait

from conftest import require_root, unique
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import FleetSync
from smtpguard.policy.model import Fleet as FleetPolicy


@pytest.fixture
def kit() -> Iterator[EtcdKit]:
    require_root()
    k = EtcdKit(unique("sgw"), loopback=True)
    try:
        k.up()
        yield k
    finally:
        k.down()


def ranges(kit: EtcdKit) -> float:
    """etcd's own count of Range calls handled (the JSON gateway's included)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in kit.metrics().splitlines()
               if line.startswith("grpc_server_handled_total{")
               and 'grpc_method="Range"' in line)


class Host:
    """One FleetSync (the agent's fleet thread and watches), watching the
    records of `vms` (the VMs it runs) and the counts of `tenants`."""

    def __init__(self, kit: EtcdKit, name: str, vms: tuple[str, ...] = (),
                 tenants: tuple[str, ...] = (), watch: str = "interest",
                 policy_prefix: str | None = None) -> None:
        self.got: list[FleetRecord] = []
        self.docs: list[tuple[list[tuple[str, str]], int]] = []  # the policy's, as handed on
        cfg = FleetPolicy(endpoints=(kit.url,), prefix=kit.prefix, host=name,
                          policy_prefix=policy_prefix)
        self.sync = FleetSync(cfg, self.got.append, [], host=name, watch=watch,
                              policy=(lambda d, r: self.docs.append((d, r)))
                              if policy_prefix else None)
        self.sync.want(vms, tenants)
        self.sync.start()

    def vms(self) -> set[str]:
        return {r.vm for r in self.got}

    def has(self, vm: str, timeout: float = 15, **want: Any) -> FleetRecord:
        """The last record of vm received, once there is one with these fields."""
        def last() -> FleetRecord | None:
            rec = next((r for r in reversed(self.got) if r.vm == vm), None)
            ok = rec is not None and all(getattr(rec, k) == v for k, v in want.items())
            return rec if ok else None
        return wait(last, timeout)


def test_changes_arrive_on_the_watch_and_idle_hosts_send_no_reads(kit: EtcdKit) -> None:
    """A change reaches the host that runs the VM on its watch, without a
    range request while nothing changes; after etcd restarts the watches
    resume and what was written since arrives."""
    a, b = Host(kit, "hostA"), Host(kit, "hostB", vms=("vm1", "vm2"))
    try:
        wait(lambda: a.sync.lease and b.sync.streaming)
        before = ranges(kit)
        a.sync.publish(FleetRecord("vm1", "hostA", state="blocked", since=time.time()))
        assert b.has("vm1", state="blocked")
        time.sleep(3)  # six of the old polling passes per host
        assert ranges(kit) == before  # nothing was polled: the watch brought it
        # etcd restarts: the watches end, then resume from the revision they
        # had, and what was written since arrives.
        kit.stop()
        wait(lambda: not b.sync.streaming)
        kit.start()
        wait(lambda: b.sync.streaming, timeout=30)
        a.sync.publish(FleetRecord("vm2", "hostA", state="throttled", since=time.time()))
        assert b.has("vm2", timeout=30, state="throttled")
    finally:
        a.sync.stop()
        b.sync.stop()


def test_a_host_hears_only_its_vms_and_a_vm_that_arrives_is_read_at_once(
        kit: EtcdKit) -> None:
    """Each host receives the records of the VMs it runs and none of the
    others'; a VM that arrives on a host that never ran it has its record read
    there at once (before its first SYN), and from then on a release on the old
    host reaches the new one."""
    w = Host(kit, "hostW")  # an operator's host: runs nothing
    a, b = Host(kit, "hostA", vms=("vm1",)), Host(kit, "hostB", vms=("vm2",))
    try:
        wait(lambda: a.sync.streaming and b.sync.streaming)
        for i in (1, 2):
            for vm in ("vm1", "vm2", "vm3"):
                w.sync.publish(FleetRecord(vm, "hostW", state="flagged", since=time.time(),
                                           reason=f"{vm} #{i}"))
            wait(lambda: not w.sync.queued())
        a.has("vm1", reason="vm1 #2")
        b.has("vm2", reason="vm2 #2")
        # vm3's changes came after vm1's and vm2's: had they been sent, they are here.
        w.sync.publish(FleetRecord("vm1", "hostW", state="flagged", since=time.time(),
                                   reason="vm1 #3"))
        w.sync.publish(FleetRecord("vm2", "hostW", state="flagged", since=time.time(),
                                   reason="vm2 #3"))
        a.has("vm1", reason="vm1 #3")
        b.has("vm2", reason="vm2 #3")
        assert a.vms() == {"vm1"} and b.vms() == {"vm2"}, (a.got, b.got)

        # hostA blocks vm1; vm1 moves to hostB, which never ran it.
        a.sync.publish(FleetRecord("vm1", "hostA", state="blocked", since=time.time(),
                                   until=time.time() + 3600, reason="spam"))
        wait(lambda: not a.sync.queued())
        arrived = b.sync.fetch("vm1", 2.0)
        assert arrived is not None and arrived.state == "blocked" and arrived.host == "hostA"
        b.sync.want(("vm1", "vm2"))  # it runs vm1 now; hostA holds vm1's block still
        wait(lambda: b.sync.streaming and "/".join((kit.prefix, "vms", "vm1"))
             in b.sync.interest.active)  # type: ignore[union-attr]
        a.sync.publish(FleetRecord("vm1", "hostA", state="ok", since=time.time(),
                                   actor="operator:root", reason="ticket 42"))
        b.has("vm1", reason="ticket 42")
        assert b.vms() == {"vm1", "vm2"}
    finally:
        for h in (w, a, b):
            h.sync.stop()


def test_a_host_that_runs_none_of_a_tenants_vms_receives_none_of_its_counts(
        kit: EtcdKit) -> None:
    """Tenant budgets: a host receives the counts of the tenants it hosts,
    from their other hosts, and not one count of any other tenant."""
    h1 = Host(kit, "host1", tenants=("t",))
    h2 = Host(kit, "host2", tenants=("t", "u"))
    h3 = Host(kit, "host3", tenants=("u",))
    try:
        wait(lambda: all(h.sync.streaming and h.sync.lease for h in (h1, h2, h3)))
        def has(h: Host, other: str, n: int) -> bool:
            return h.sync.tenant_counts("t").get(other, {}).get("attempts") == n

        for i in range(1, 4):
            h1.sync.share_tenant("t", {"attempts": 10 * i, "vms": ["t1"], "at": time.time()})
            h2.sync.share_tenant("t", {"attempts": 20 * i, "vms": ["t2"], "at": time.time()})
            wait(lambda i=i: has(h1, "host2", 20 * i))  # type: ignore[misc]
            wait(lambda i=i: has(h2, "host1", 10 * i))  # type: ignore[misc]
        # Written after every count of t: had those been sent to host3, they came first.
        h2.sync.share_tenant("u", {"attempts": 5, "vms": ["u2"], "at": time.time()})
        wait(lambda: h3.sync.tenant_counts("u").get("host2"))
        assert h1.sync.tenant_received["t"] >= 3 and h2.sync.tenant_received["t"] >= 3
        assert h3.sync.tenant_received == {"u": 1}, h3.sync.tenant_received
        assert h3.sync.tenant_counts("t") == {}
        assert "u" not in h1.sync.tenant_received
    finally:
        for h in (h1, h2, h3):
            h.sync.stop()


def test_after_a_restart_and_a_compaction_each_host_has_exactly_its_records(
        kit: EtcdKit) -> None:
    """etcd restarts with changes queued meanwhile, then its history is
    compacted past where a host's watches stood: that host reads its keys
    again and has exactly the records of its VMs, at their latest."""
    w = Host(kit, "hostW")
    a, b = Host(kit, "hostA", vms=("vm1", "vm2")), Host(kit, "hostB", vms=("vm3",))
    try:
        wait(lambda: all(h.sync.streaming for h in (a, b)) and w.sync.lease)
        for vm in ("vm1", "vm2", "vm3", "vm4"):
            w.sync.publish(FleetRecord(vm, "hostW", state="flagged", since=time.time(),
                                       reason=f"{vm} #1"))
        b.has("vm3")
        a.has("vm2")
        kit.stop()
        wait(lambda: not a.sync.streaming and not b.sync.streaming)
        for vm in ("vm1", "vm3", "vm4"):
            w.sync.publish(FleetRecord(vm, "hostW", state="blocked", since=time.time(),
                                       reason=f"{vm} #2"))
        kit.start()
        wait(lambda: not w.sync.queued(), timeout=30)
        a.has("vm1", timeout=30, reason="vm1 #2")
        b.has("vm3", timeout=30, reason="vm3 #2")

        # hostB falls behind a compaction: as if its watches stood at
        # revision 2 and it had lost what it read since.
        w.sync.publish(FleetRecord("vm3", "hostW", state="ok", since=time.time(),
                                   reason="vm3 #3"))
        w.sync.publish(FleetRecord("vm2", "hostW", state="ok", since=time.time(),
                                   reason="vm2 #3"))
        a.has("vm2")
        wait(lambda: not w.sync.queued())
        rev = int(kit._post("/kv/range", {"key": "AA=="})["header"]["revision"])
        kit._post("/kv/compaction", {"revision": rev, "physical": True})
        interest = b.sync.interest
        assert interest is not None
        reads = interest.reads
        with b.sync._read_lock, interest._lock:
            for key in interest.upto:
                interest.upto[key] = 2
            b.sync.seen.clear()
            b.got.clear()
        interest.grpc.close()  # the stream ends; the watch resumes from revision 3
        b.has("vm3", reason="vm3 #3")  # read again in full
        wait(lambda: b.sync.streaming)
        assert interest.reads > reads
        assert b.vms() == {"vm3"} and len(b.got) == 1, b.got
        assert {r.vm for r in a.got} == {"vm1", "vm2"}
        a.has("vm2", reason="vm2 #3")
        a.has("vm1", reason="vm1 #2")
    finally:
        for h in (w, a, b):
            h.sync.stop()


def test_the_policy_prefix_is_one_more_watch_on_the_stream(kit: EtcdKit) -> None:
    """fleet.policy_prefix on the interest stream: a document put, changed or
    deleted (etcdctl's way) is handed on with the others, at its revision."""
    pp = f"{kit.prefix}/policy"
    h = Host(kit, "hostP", policy_prefix=pp)
    try:
        wait(lambda: h.sync.streaming and h.docs)
        assert h.docs[-1][0] == []
        rev1 = kit.put(f"{pp}/10-a.yaml", "classes: {}")
        wait(lambda: h.docs[-1][1] == rev1)
        rev2 = kit.put(f"{pp}/20-b.yaml", "version: 1")
        wait(lambda: h.docs[-1][1] == rev2)
        assert [n for n, _ in h.docs[-1][0]] == [f"etcd:{pp}/10-a.yaml", f"etcd:{pp}/20-b.yaml"]
        kit._post("/kv/deleterange", {"key": base64.b64encode(f"{pp}/10-a.yaml".encode())
                                      .decode()})
        wait(lambda: [n for n, _ in h.docs[-1][0]] == [f"etcd:{pp}/20-b.yaml"])
        assert h.sync.etcd.errors == {}
    finally:
        h.sync.stop()


def test_without_the_grpc_client_the_gateways_prefix_watch_still_serves(
        kit: EtcdKit) -> None:
    """The fallback (no aetcd): the JSON gateway's watch of the whole prefix;
    every change of the fleet arrives, the VMs a host runs among them."""
    a = Host(kit, "hostA")
    b = Host(kit, "hostB", vms=("vm1",), watch="prefix")
    try:
        wait(lambda: a.sync.lease and b.sync.streaming)
        assert b.sync.interest is None
        a.sync.publish(FleetRecord("vm1", "hostA", state="blocked", since=time.time()))
        a.sync.publish(FleetRecord("vm9", "hostA", state="flagged", since=time.time()))
        b.has("vm1", state="blocked")
        b.has("vm9", state="flagged")  # not one it runs: the broadcast it falls back to
    finally:
        a.sync.stop()
        b.sync.stop()


def test_leases_lost_in_etcd_are_granted_again_and_the_records_rewritten(
        kit: EtcdKit) -> None:
    """Both of a host's leases revoked in etcd (as a restore from an old backup
    or an operator's mistake would lose them): its records and presence go with
    them; at its next keepalive (on the gRPC stream) the host takes new leases
    and writes what it holds again."""
    cfg = FleetPolicy(endpoints=(kit.url,), prefix=kit.prefix, host="hostL", host_ttl=3.0)
    sync = FleetSync(cfg, lambda r: None, [], host="hostL")
    try:
        sync.start()
        wait(lambda: sync.lease)
        sync.publish(FleetRecord("vm1", "hostL", state="blocked", since=time.time(),
                                 reason="spam"))
        wait(lambda: kit.get(f"{kit.prefix}/vms/vm1"))
        old = (sync.lease, sync.host_lease)
        for lease in old:
            kit._post("/lease/revoke", {"ID": lease})
        assert kit.get(f"{kit.prefix}/vms/vm1") is None
        wait(lambda: (sync.lease, sync.host_lease) != old and sync.lease not in old
             and sync.host_lease not in old)
        rec = wait(lambda: kit.get(f"{kit.prefix}/vms/vm1"))
        assert rec["state"] == "blocked" and rec["reason"] == "spam"
        assert wait(lambda: kit.get(f"{kit.prefix}/hosts/hostL"))
    finally:
        sync.stop()
