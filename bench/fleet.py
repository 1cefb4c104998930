"""The fleet against one etcd: write rate, read rate, and how long a VM's
block takes to reach every other host after it moved (issue 19: "200
simulated agents against one etcd: write rate, convergence after a migration
(target < 1 s); on paper, the same for 1,000 hosts").

A real etcd (Debian's etcd-server, /usr/bin/etcd) on loopback, unused ports,
a temporary data directory, removed at the end. The agents are the real
thing minus the datapath: FleetSync instances (smtpguard.fleet.sync, its
threads, the real Etcd client over the JSON gateway, a watch stream each on
the fleet's prefix), one per simulated host and all in this process, each
with its own host name and an `incoming` callback that notes when it first
saw each migration's record. Two fleets, one after the other on the same
etcd, each under its own key prefix: 200 agents, and 20 beside them for the
scaling.

- Steady load: every host holds 5 VM records and re-publishes one of them
  (a new decision, `since` now) every 5 s, spread evenly over the fleet: 40
  writes/s with 200 hosts, 4 with 20 (a busy fleet: an agent publishes only
  when one of its VMs changes state).
- A migration: a VM whose record host A wrote seconds before is published
  blocked by host B (what B's agent does when the VM's interface appears on
  it and B decides); the clock starts before B's publish() and stops, for
  each of the other hosts (A among them), when its incoming callback has
  the record. 20 migrations a fleet, one at a time, 0.2-0.7 s apart.
- Write rate: the store's revision growth (every successful put or txn is
  one revision), beside the FleetSync.published counters. Reads: etcd's own
  count of Range calls (grpc_server_handled_total), beside what the polling
  design sent (hosts / 0.5 s), and the records the watches delivered.
- With the agents gone, the server's CPU per poll that finds nothing new,
  the request the polling design sent (and FleetSync still sends while its
  watch is down), on a prefix of 0, 1,000 and 5,000 records (5,000: 1,000
  hosts of 5 VMs each): etcd answers a range with min_mod_revision by
  reading every key of the range and then dropping the older ones, so a
  poll costs the size of the prefix, not of the change.

On paper, 1,000 hosts: every change still goes to each of the 999 others
(that is the point), so etcd's work is deliveries, writes x 999, at the CPU
per delivery measured here with 200 watchers; polling would have added
1,000 / 0.5 s = 2,000 whole-prefix ranges a second whatever changed (the
probe above prices one).
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

from etcdserver import EtcdServer
from simfleet import MIGRATIONS, REPUBLISH, TIMEOUT, VMS, SimFleet
from smtpguard import logs
from smtpguard.fleet.etcd import Etcd
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import POLL
from smtpguard.policy.model import Fleet as FleetPolicy
from table import Row, pct

SECTION = "9 fleet"
BIG, SMALL = 200, 20
PAPER = 1000  # hosts, extrapolated
PROBES = 300  # empty polls per prefix size, agents gone


def probe(etcd: EtcdServer, prefix: str, n: int) -> float:
    """etcd's CPU microseconds per poll that finds nothing new, on a prefix
    of n records (FleetSync._read's request, through the same client)."""
    if n:
        rec = FleetRecord("vm", "hostx", since=time.time()).to_json()
        etcd.fill(f"{prefix}/vms", n, rec)
    client = Etcd(FleetPolicy(endpoints=(etcd.url,), prefix=prefix, host="probe"))
    rev, kvs = client.range(f"{prefix}/vms/")
    assert len(kvs) == n, (len(kvs), n)
    for _ in range(20):
        client.range(f"{prefix}/vms/", rev + 1)
    c0 = etcd.cpu()
    for _ in range(PROBES):
        client.range(f"{prefix}/vms/", rev + 1)
    return (etcd.cpu() - c0) / PROBES * 1e6


def _ms(v: float) -> str:
    return f"{v * 1000:.0f} ms"


def run() -> list[Row]:
    logs.configure("warning", sys.stderr)  # 200 agents' fleet.connected lines otherwise
    with EtcdServer() as etcd:
        small = SimFleet(etcd, SMALL).run()
        big = SimFleet(etcd, BIG).run()
        base = f"/smtpguard-bench/probe-{uuid.uuid4().hex[:8]}"
        cost = {n: probe(etcd, f"{base}/p{n}", n) for n in (0, 1000, VMS * PAPER)}
    return rows(small, big, cost)


def rows(small: dict[str, Any], big: dict[str, Any], cost: dict[int, float]) -> list[Row]:
    out: list[Row] = []
    b, s = big, small
    load = f"{VMS} VMs a host, one re-published every {REPUBLISH:.0f} s"
    out.append(Row(SECTION, f"etcd writes, {b['n']} agents ({load})", b["writes"], "/s",
                   f"{s['n']} agents {s['writes']:.1f}/s",
                   note=f"revision growth over {b['seconds']:.0f} s of load and "
                        f"{MIGRATIONS} migrations; FleetSync.published {b['published']:.1f}/s "
                        f"({s['published']:.1f}/s with {s['n']}); CAS txns that failed "
                        f"{b['conflicts']:.0f} ({s['conflicts']:.0f}); failed etcd requests "
                        f"(FleetSync's Etcd.errors) {b['errors']} ({s['errors']}) while "
                        f"measured, {b['errors_all']} ({s['errors_all']}) with start and "
                        f"seeding"))
    out.append(Row(SECTION, f"etcd range requests, {b['n']} agents", b["ranges"],
                   "/s", f"polling design {b['n'] / POLL:.0f}/s ({s['n']} agents: "
                         f"{s['ranges']:.1f}/s)",
                   note=f"etcd's grpc_server_handled_total{{grpc_method=Range}}; changes come "
                        f"on the watches ({b['watching']} of {b['n']} streaming at the end, "
                        f"{b['rewatch']} ended and resumed while measured): "
                        f"{b['received']:,.0f} records delivered/s to the agents"))
    for f in (b, s):
        d = f["delays"]
        others = f["n"] - 1
        label = (f"migration -> seen by the {others} other hosts, {f['n']} agents "
                 f"({len(d):,} arrivals)")
        ref = (f"{s['n']} agents p99 {_ms(pct(s['delays'], 99))}" if f is b
               else f"{b['n']} agents p99 {_ms(pct(b['delays'], 99))}")
        out.append(Row(SECTION, f"{label}: p50", pct(d, 50) * 1000, "ms", ""))
        out.append(Row(
            SECTION, f"{label}: p99", pct(d, 99) * 1000, "ms", ref, "< 1 s",
            pct(d, 99) < 1.0 and not f["missing"],
            note=f"max {_ms(max(d))}; last of the {others} hosts per migration: p50 "
                 f"{_ms(pct(f['lasts'], 50))}, worst {_ms(max(f['lasts']))}; "
                 f"{f['missing']} arrivals missing after {TIMEOUT:.0f} s; "
                 f"{MIGRATIONS} migrations, one at a time, under the steady load; "
                 f"all agents connected in {f['connect']:.1f} s"))
        out.append(Row(SECTION, f"{label}: max (the last host, worst migration)",
                       max(d) * 1000, "ms", "", "< 1 s", max(d) < 1.0 and not f["missing"]))
    out.append(Row(SECTION, f"CPU, etcd / the {b['n']} agents' process", b["etcd_cpu"] * 100,
                   "% of a CPU", f"{s['n']} agents {s['etcd_cpu'] * 100:.0f}% / "
                                 f"{s['our_cpu'] * 100:.0f}%",
                   note=f"agents' process {b['our_cpu'] * 100:.0f}% of a CPU (all "
                        f"{b['n']} FleetSync threads, the load, the measurement; one "
                        f"interpreter, so one CPU at most)"))
    big_p = VMS * PAPER
    out.append(Row(SECTION, f"etcd CPU per poll, nothing new, prefix of {big_p:,} records",
                   cost[big_p], "us", f"1,000 records {cost[1000]:.0f} us, none "
                                      f"{cost[0]:.0f} us",
                   note=f"{PROBES} polls each, one client, agents gone: etcd reads the whole "
                        f"prefix for a range with min_mod_revision"))
    polls = PAPER / POLL
    writes = PAPER / REPUBLISH
    deliveries = writes * (PAPER - 1)
    per_delivery = b["etcd_cpu"] / max(b["received"], 1.0)  # all of etcd's CPU, writes too
    out.append(Row(SECTION, f"on paper, {PAPER:,} hosts: deliveries", deliveries, "/s",
                   f"measured {b['n']} hosts {b['received']:,.0f}/s",
                   note=f"{writes:.0f} writes/s (the same load a host), each to the "
                        f"{PAPER - 1} other hosts' watches"))
    out.append(Row(SECTION, f"on paper, {PAPER:,} hosts: etcd CPU", deliveries * per_delivery,
                   "CPUs", f"polling would add {polls * cost[big_p] / 1e6:.1f}",
                   note=f"{per_delivery * 1e6:.1f} us of etcd CPU per delivered record "
                        f"(everything etcd did with {b['n']} agents, writes and leases "
                        f"included, over what it delivered); polling: {polls:.0f} ranges/s "
                        f"x {cost[big_p]:.0f} us (the probe above), whatever changed"))
    return out


if __name__ == "__main__":
    from table import render

    print(render(run()))
