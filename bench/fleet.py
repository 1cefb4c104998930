"""The fleet against one etcd, both designs side by side in one run (issue
27: "1,000 simulated agents ... etcd CPU, deliveries per second, a migrated
VM's block in force on the new host p99; and the projection for 10,000 hosts.
Target: < 2 CPUs of etcd on paper for 10,000 hosts, migration p99 < 1 s").

A real etcd (Debian's etcd-server, /usr/bin/etcd) on loopback, unused ports,
a temporary data directory, removed at the end. The agents are the real
thing minus the datapath: FleetSync instances (smtpguard.fleet.sync, their
threads, the real clients), one per simulated host, all in this process.

- Broadcast (the design before: simfleet.py): every host watches the whole
  prefix on the JSON gateway. 200 agents, 5 VM records each, one re-published
  a host every 5 s; a migration is timed from the publish on host B to each
  other host's receipt. Its etcd work is a delivery per change per host, so
  it is measured at 200 hosts (1,000 would need ~18 CPUs of etcd; this
  machine has 2) and put on paper at 1,000 and 10,000 from the CPU per
  delivery measured.
- Interest (issue 27: interestfleet.py): 1,000 agents in 4 processes, 50 VMs
  each, watched key by key on etcd's gRPC API; tenants over 20 hosts each,
  one a host with steady mail traffic, its count published by the agent's
  rule (fleet.tenants.due: a minute apart far below the budget); one VM
  state change a host every 5 s. A migration is timed from the VM's arrival
  on B to B's read of its block (the read FleetLink.arrive does before the
  interface is enforced), and a release on the old host to its arrival at
  the new one. A change reaches the hosts that run its VM or tenant, so
  etcd's work grows with the hosts, not with their square. On paper, 10,000
  hosts: ten times the idle phase's cost (the agents' streams, keepalives,
  pings) plus the rate phase's (the same agents with ten times the load:
  10,000 hosts' writes and deliveries), scaled to the exact rate when this
  machine fell short of it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from etcdserver import EtcdServer
from interestfleet import ACTIVE, BUDGET, RATE, SHARE, TENANT_HOSTS, InterestFleet
from interestfleet import VMS as IVMS
from simfleet import MIGRATIONS, REPUBLISH, TIMEOUT, VMS, SimFleet
from smtpguard import logs
from table import Row, pct

SECTION = "9 fleet"
OLD = 200
NEW = int(os.environ.get("SMTPGUARD_BENCH_FLEET_HOSTS", "1000"))
PAPER = 10_000  # hosts, extrapolated


def _ms(v: float) -> str:
    return f"{v * 1000:.0f} ms"


def run() -> list[Row]:
    logs.configure("warning", sys.stderr)  # 1,200 agents' fleet.connected lines otherwise
    with EtcdServer() as etcd:
        old = SimFleet(etcd, OLD).run()
        new = InterestFleet(etcd, NEW).run()
    return rows(old, new)


def paper(n: dict[str, Any]) -> tuple[float, float, float]:
    """(10,000 hosts' etcd CPU, the writes a second it stands for, the rate
    phase's share of them reached): ten times the idle phase, plus the rate
    phase's load (its CPU above idle) scaled to exactly PAPER / n times the
    load phase's writes."""
    idle, load, rate = n["idle"], n["load"], n["rate"]
    k = PAPER / n["n"]
    target = load["writes"] * k
    reached = rate["writes"] / max(target / k * RATE, 1e-9)
    cpu = idle["etcd_cpu"] * k + per_write(n, "rate") * target
    return cpu, target, reached


def per_write(n: dict[str, Any], phase: str) -> float:
    """etcd's CPU seconds a write in the phase, above the idle phase's."""
    p = n[phase]
    return float(max(p["etcd_cpu"] - n["idle"]["etcd_cpu"], 0.0) / max(p["writes"], 1e-9))


def rows(o: dict[str, Any], n: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    idle, load, rate = n["idle"], n["load"], n["rate"]
    per_delivery = o["etcd_cpu"] / max(o["received"], 1.0)
    old_1k = (1000 / REPUBLISH) * 999 * per_delivery
    old_10k = (PAPER / REPUBLISH) * (PAPER - 1) * per_delivery
    new_10k, target, reached = paper(n)
    linear = load["etcd_cpu"] * PAPER / n["n"]
    what = (f"interest: {n['n']} agents, {IVMS} VMs each, a change a host every "
            f"{REPUBLISH:.0f} s, tenants over {TENANT_HOSTS} hosts, {ACTIVE} a host with "
            f"steady traffic (budget {BUDGET:,} an hour), looked at every {SHARE:.0f} s")
    out.append(Row(SECTION, f"etcd CPU, {n['n']} agents (interest, gRPC)",
                   load["etcd_cpu"] * 100, "% of a CPU",
                   f"broadcast {o['n']} agents {o['etcd_cpu'] * 100:.0f}% (1,000 on paper: "
                   f"{old_1k:.1f} CPUs)",
                   note=f"{what}; idle (load paused) {idle['etcd_cpu'] * 100:.1f}%; writes "
                        f"{load['writes']:.0f}/s (counts {load['shared']:.0f}/s; broadcast "
                        f"{o['writes']:.0f}/s); {n['watches']:,} watches on {n['n']} streams; "
                        f"agents' processes {load['our_cpu'] * 100:.0f}% of a CPU; all "
                        f"watching in {n['connect']:.0f} s; failed etcd requests "
                        f"{n['errors']}"))
    out.append(Row(SECTION, f"deliveries, {n['n']} agents (interest)", load["deliveries"], "/s",
                   f"broadcast {o['n']} agents {o['received']:,.0f}/s (1,000 on paper: "
                   f"{1000 / REPUBLISH * 999:,.0f}/s)",
                   note=f"changes on the watches, each host's own included: VM records "
                        f"{load['deliveries'] - load['counts']:,.0f}/s, tenant counts "
                        f"{load['counts']:,.0f}/s (to the tenant's other hosts); range requests "
                        f"{n['ranges']:.1f}/s (the arrival reads)"))
    a = n["arrivals"]
    d = o["delays"]
    out.append(Row(SECTION, f"migrated VM's block in force on the new host, {n['n']} agents: "
                            f"p99", pct(a, 99) * 1000, "ms",
                   f"broadcast {o['n']} agents p99 {_ms(pct(d, 99))} (publish -> every "
                   f"other host)", "< 1 s", pct(a, 99) < 1.0,
                   note=f"the arrival read (FleetLink.arrive), {len(a)} migrations: p50 "
                        f"{_ms(pct(a, 50))}, max {_ms(max(a))}; broadcast: p50 "
                        f"{_ms(pct(d, 50))}, {o['missing']} arrivals missing after "
                        f"{TIMEOUT:.0f} s, {MIGRATIONS} migrations"))
    r = n["releases"]
    if r:
        out.append(Row(SECTION, f"release on the old host -> the new host, {n['n']} agents: "
                                f"p99", pct(r, 99) * 1000, "ms", "", "< 1 s",
                       pct(r, 99) < 1.0 and not n["missing"],
                       note=f"p50 {_ms(pct(r, 50))}; {n['missing']} missing after "
                            f"{TIMEOUT:.0f} s"))
    out.append(Row(SECTION, f"etcd CPU, {n['n']} agents at {RATE} x their load",
                   rate["etcd_cpu"] * 100, "% of a CPU", "",
                   note=f"the writes and deliveries of {n['n'] * RATE:,} hosts: writes "
                        f"{rate['writes']:,.0f}/s ({reached * 100:.0f}% of {RATE} x the load "
                        f"phase's), deliveries {rate['deliveries']:,.0f}/s; etcd "
                        f"{per_write(n, 'rate') * 1e6:.0f} us a write above idle (load phase: "
                        f"{per_write(n, 'load') * 1e6:.0f} us)"))
    out.append(Row(SECTION, f"on paper, {PAPER:,} hosts: etcd CPU (interest)", new_10k,
                   "CPUs", f"broadcast {old_10k:,.0f}", "< 2", new_10k < 2.0,
                   note=f"interest: {PAPER // n['n']} x the idle phase "
                        f"({idle['etcd_cpu'] * PAPER / n['n']:.2f}) + the rate phase above idle, "
                        f"at {target:,.0f} writes/s; {PAPER // n['n']} x the load phase would "
                        f"say {linear:.1f}; broadcast: {PAPER / REPUBLISH:,.0f} changes/s x "
                        f"{PAPER - 1:,} hosts x {per_delivery * 1e6:.0f} us a delivery "
                        f"(measured with {o['n']} agents, {VMS} VMs each)"))
    out.append(Row(SECTION, f"on paper, {PAPER:,} hosts: deliveries (interest)",
                   load["deliveries"] * PAPER / n["n"], "/s",
                   f"broadcast {PAPER / REPUBLISH * (PAPER - 1):,.0f}/s"))
    return out


if __name__ == "__main__":
    from table import render

    print(render(run()))
