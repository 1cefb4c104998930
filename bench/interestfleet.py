"""The simulated fleet of bench/fleet.py in the design of issue 27: each host
watches only the records of its VMs and the counts of its tenants, on etcd's
gRPC API (FleetSync's "interest" watch), and reads an arriving VM's record
when it arrives.

n real FleetSync agents (their threads, the real client: etcd's gRPC API
for the watches, the arrival reads, the writes and the leases), spread over
PROCESSES processes (one Python process cannot keep 1,000 agents' leases
alive: its threads share one GIL), each host VMS VMs; tenants spread over
TENANT_HOSTS hosts each (VM j of host i belongs to tenant t<i // TENANT_HOSTS>-<j>:
a tenant has one VM on each of TENANT_HOSTS hosts). Load: one VM state change
a host every REPUBLISH seconds; ACTIVE tenants a host with steady mail
traffic (a new connection every 5 s on each of its hosts: LEVEL in the
hour's window, 14,400 over its 20 hosts, against a budget of BUDGET), whose
count each host looks at every SHARE seconds and publishes by the agent's
own rule (fleet.tenants.due). The records, and the counts as last published
(at random times within the refresh), are laid down in etcd before the
agents start, as a fleet that ran before has them.

Three phases, one after the other, on the same agents:
- idle: the load paused; etcd's cost of the agents being there (their
  streams, keepalives, gRPC pings);
- load: the load above, and the migrations. A migration: host A blocks a VM
  it runs (its record written); the VM moves to host B, which never ran it:
  the clock starts when B "sees its interface" and stops when B's arrival
  read has the block (FleetLink.arrive's read, the step before the interface
  is enforced). Then A's operator releases it: the clock runs until B has
  the release on its watch (A still watches the VM: it holds a decision for
  it);
- rate: every host's load times RATE (VM changes, count looks, and the count
  refresh shortened alike), so that etcd handles the writes and deliveries
  of RATE times as many hosts (etcd's cost per write falls as the rate
  grows: a linear projection from the load phase overstates it).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import sys
import threading
import time
import uuid
from typing import Any

from etcdserver import EtcdServer
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import FleetSync
from smtpguard.fleet.tenants import REFRESH, STALE, due
from smtpguard.policy.model import Fleet as FleetPolicy

VMS = 50
TENANT_HOSTS = 20
ACTIVE = 1  # tenants with mail traffic, per host
SHARE = 5.0  # tenant_budget.share_every's default
LEVEL = 720  # an active tenant's count on a host: a connection every 5 s, an hour's window
BUDGET = 50_000  # its budget an hour (its TENANT_HOSTS hosts together: 14,400)
REPUBLISH = 5.0
MIGRATIONS = 20
WARMUP = 3.0
IDLE = 8.0  # seconds of the idle phase
RATE = 10  # the rate phase: each host's load times this
RATE_SECONDS = 10.0
TIMEOUT = 10.0


def tenant(i: int, j: int) -> str:
    return f"t{i // TENANT_HOSTS}-{j}"


def seeded(i: int, j: int, now: float) -> tuple[int, float]:
    """Host i's count for its active tenant j as last published, and when
    (within the refresh): the same in every process."""
    rng = random.Random(i * 1000 + j)
    return LEVEL + rng.randint(-20, 20), now - rng.uniform(0, REFRESH * SHARE)


PROCESSES = 4  # the agents' processes, this one included (it runs the migrations)
MAIN = 40  # hosts in this process: the migrations' (its loop times their reads)


class Slice:
    """Hosts i0..i1 of the fleet, their agents and their share of the load,
    in one process; sample() reads its counters, and its process's CPU."""

    def __init__(self, url: str, prefix: str, n: int, i0: int, i1: int) -> None:
        self.n, self.i0 = n, i0
        self.hosts = [f"host{i:04d}" for i in range(i0, i1)]
        self.vms = {h: [f"{h}-vm{j}" for j in range(VMS)] for h in self.hosts}
        self.release_seen: dict[str, float] = {}
        self.syncs = [FleetSync(FleetPolicy(endpoints=(url,), prefix=prefix, host=h),
                                self._incoming, [], host=h, poll=2.0) for h in self.hosts]
        self.by_host = dict(zip(self.hosts, self.syncs, strict=True))
        self._stop = threading.Event()
        self._loader = threading.Thread(target=self._load, name="bench-load", daemon=True)
        self.running = threading.Event()  # the load runs (paused in the idle phase)
        self.scale = 1.0  # the load's rate, times
        self.shared = 0  # counts published
        # (host, tenant) -> [its count now, as last published, when]
        self.counts: dict[tuple[str, str], list[float]] = {}
        now = time.time()
        for h in self.hosts:
            for j in range(ACTIVE):
                mine, at = seeded(int(h[4:]), j, now)
                self.counts[(h, tenant(int(h[4:]), j))] = [mine, mine, at]

    def _incoming(self, rec: FleetRecord) -> None:
        if rec.reason == "bench: released" and rec.vm not in self.release_seen:
            self.release_seen[rec.vm] = time.monotonic()

    def tenants(self, h: str) -> list[str]:
        return [tenant(int(h[4:]), j) for j in range(VMS)]

    def start(self) -> float:
        """Every agent connected and every watch streaming; then the load."""
        t0 = time.monotonic()
        for h, s in self.by_host.items():
            s.want(self.vms[h], self.tenants(h))
            s.start()
        while not all(s.lease and s.streaming for s in self.syncs):
            if time.monotonic() - t0 > 300:
                raise RuntimeError(f"{sum(not s.streaming for s in self.syncs)} of "
                                   f"{len(self.syncs)} agents were not watching in 300 s")
            time.sleep(0.2)
        return time.monotonic() - t0

    def go(self) -> None:
        """The load starts, every count last published at a random time
        within the refresh (steady state: refreshes spread evenly)."""
        now = time.time()
        for c in self.counts.values():
            c[2] = now - random.uniform(0, REFRESH * SHARE)
        self.running.set()
        self._loader.start()

    def control(self, cmd: Any) -> None:
        """("go",), ("pause",), ("resume",), ("scale", k)."""
        if cmd[0] == "go":
            self.go()
        elif cmd[0] == "pause":
            self.running.clear()
        elif cmd[0] == "resume":
            self.running.set()
        elif cmd[0] == "scale":
            self.scale = float(cmd[1])

    def _load(self) -> None:
        """A VM state change every REPUBLISH s a host; a look at each active
        tenant's count every SHARE s a host; spread evenly over this slice's
        hosts, times `scale`."""
        m = len(self.hosts)
        pairs = list(self.counts)
        per_s = m / REPUBLISH + len(pairs) / SHARE
        ratio = (m / REPUBLISH) / per_s
        nxt = time.monotonic()
        i = 0
        while not self._stop.is_set():
            if not self.running.is_set():
                self.running.wait(0.2)
                nxt = time.monotonic()
                continue
            if random.random() < ratio:
                h = self.hosts[random.randrange(m)]
                vm = self.vms[h][(i // m) % VMS]
                self.by_host[h].publish(FleetRecord(vm, h, since=time.time(),
                                                    reason=f"load {i}"))
            else:
                self._look(*pairs[random.randrange(len(pairs))])
            i += 1
            nxt += 1.0 / (per_s * self.scale)
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def _look(self, h: str, t: str) -> None:
        """One look at host h's count for tenant t, as TenantBudgets.step does:
        the count moves by one (a connection in, one out of the window), and
        goes out by the agent's rule."""
        c = self.counts[(h, t)]
        c[0] = max(0, c[0] + random.choice((-1, 0, 1)))
        now = time.time()
        sync = self.by_host[h]
        total, hosts = int(c[0]), 1
        for host, other in sync.tenant_counts(t).items():
            at = other.get("at")
            if host != h and isinstance(at, (int, float)) and at >= now - STALE * SHARE:
                n = other.get("attempts")
                total += int(n) if isinstance(n, (int, float)) else 0
                hosts += 1
        if due(int(c[0]), int(c[1]), total, hosts, BUDGET, now - c[2],
               REFRESH * SHARE / self.scale):
            sync.share_tenant(t, {"attempts": int(c[0]), "vms": [f"{h}-vm0"], "at": now})
            c[1], c[2] = c[0], now
            self.shared += 1

    def sample(self) -> dict[str, float]:
        return {
            "events": sum(s.interest.events for s in self.syncs if s.interest is not None),
            "received": sum(s.received for s in self.syncs),
            "counts": sum(sum(s.tenant_received.values()) for s in self.syncs),
            "errors": sum(sum(s.etcd.errors.values()) for s in self.syncs),
            "cpu": time.process_time(),
            "watches": sum(len(s.interest.active) for s in self.syncs if s.interest),
            "shared": self.shared,
        }

    def stop(self) -> None:
        self._stop.set()
        if self._loader.is_alive():
            self._loader.join(5)
        for s in self.syncs:
            s.stop()


def serve(url: str, prefix: str, n: int, i0: int, i1: int, conn: Any) -> None:
    """A worker process: its slice, driven over conn ("sample", "stop")."""
    from smtpguard import logs

    logs.configure("warning", sys.stderr)
    sl = Slice(url, prefix, n, i0, i1)
    try:
        conn.send(("ready", sl.start()))
        while True:
            cmd = conn.recv()
            if cmd == "stop":
                break
            if cmd == "sample":
                conn.send(sl.sample())
            else:
                sl.control(cmd)
                conn.send("ok")
    finally:
        sl.stop()


class Sample:
    def __init__(self, etcd: EtcdServer, parts: list[dict[str, float]]) -> None:
        self.t = time.monotonic()
        self.etcd_cpu = etcd.cpu()  # first: etcd's /metrics page costs it CPU
        self.rev = etcd.revision()
        self.calls = etcd.calls()
        total = {k: sum(p[k] for p in parts) for k in parts[0]}
        self.our_cpu = total["cpu"]
        self.events = total["events"]
        self.received = total["received"]
        self.counts = total["counts"]
        self.errors = total["errors"]
        self.watches = total["watches"]
        self.shared = total["shared"]


class InterestFleet:
    def __init__(self, etcd: EtcdServer, n: int) -> None:
        self.etcd = etcd
        self.n = n
        self.prefix = f"/smtpguard-bench/{uuid.uuid4().hex[:8]}/i{n}"
        self.hosts = [f"host{i:04d}" for i in range(n)]
        # The last slice is this process's: the migrations run between its hosts.
        rest = n - MAIN
        cuts = [rest * k // (PROCESSES - 1) for k in range(PROCESSES)] + [n]
        self.slices = list(zip(cuts[:-1], cuts[1:], strict=True))
        self.main: Slice | None = None
        self.workers: list[tuple[Any, Any]] = []

    def _control(self, cmd: tuple[Any, ...]) -> None:
        assert self.main is not None
        self.main.control(cmd)
        for _, conn in self.workers:
            conn.send(cmd)
            assert conn.recv() == "ok"

    def _sample(self) -> Sample:
        assert self.main is not None
        parts = [self.main.sample()]
        for _, conn in self.workers:
            conn.send("sample")
            parts.append(conn.recv())
        return Sample(self.etcd, parts)

    def start(self) -> float:
        """Records laid down (as a fleet that ran before has them), every
        agent connected and every watch streaming, in every process."""
        now = time.time()
        self.etcd.put_many([(f"{self.prefix}/vms/{h}-vm{j}",
                             FleetRecord(f"{h}-vm{j}", h, since=now).to_json())
                            for h in self.hosts for j in range(VMS)])
        counts = []
        for i, h in enumerate(self.hosts):
            for j in range(ACTIVE):
                mine, at = seeded(i, j, now)
                counts.append((f"{self.prefix}/tenants/{tenant(i, j)}/{h}",
                               json.dumps({"attempts": mine, "vms": [f"{h}-vm0"], "at": at})))
        self.etcd.put_many(counts)
        t0 = time.monotonic()
        ctx = mp.get_context("spawn")  # grpc does not survive a fork
        for i0, i1 in self.slices[:-1]:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve, args=(self.etcd.url, self.prefix, self.n, i0, i1,
                                                   child), daemon=True)
            proc.start()
            self.workers.append((proc, parent))
        self.main = Slice(self.etcd.url, self.prefix, self.n, *self.slices[-1])
        self.main.start()
        for proc, conn in self.workers:
            if not conn.poll(300):
                raise RuntimeError(f"a worker (pid {proc.pid}) was not watching in 300 s")
            what, _ = conn.recv()
            assert what == "ready", what
        self._control(("go",))  # every slice's load at once
        return time.monotonic() - t0

    def migrate(self, k: int) -> tuple[float, float | None]:
        """(seconds until B's arrival read had the block, seconds until B had
        A's release on its watch, None if not within TIMEOUT)."""
        sl = self.main
        assert sl is not None
        m = len(sl.hosts)
        a = sl.hosts[(k * 37) % m]
        b = sl.hosts[((k * 37) + m // 2) % m]
        vm = sl.vms[a][VMS - 1 - k % VMS]
        sa, sb = sl.by_host[a], sl.by_host[b]
        now = time.time()
        sa.publish(FleetRecord(vm, a, state="blocked", since=now, until=now + 3600,
                               reason="bench: blocked", blocks=(now,)))
        while sa.queued():
            time.sleep(0.005)
        t0 = time.monotonic()
        rec = sb.fetch(vm, 2.0)
        arrival = time.monotonic() - t0
        assert rec is not None and rec.state == "blocked", rec
        sl.vms[b].append(vm)
        sb.want(sl.vms[b], sl.tenants(b))
        while not sb.streaming:
            time.sleep(0.005)
        t1 = time.monotonic()
        sa.publish(FleetRecord(vm, a, state="ok", since=time.time(), actor="operator:root",
                               reason="bench: released"))
        while vm not in sl.release_seen and time.monotonic() - t1 < TIMEOUT:
            time.sleep(0.002)
        seen = sl.release_seen.get(vm)
        return arrival, (seen - t1) if seen is not None else None

    def stop(self) -> None:
        if self.main is not None:
            self.main.stop()
        for proc, conn in self.workers:
            try:
                conn.send("stop")
            except OSError:
                pass
            proc.join(20)
            if proc.is_alive():
                proc.kill()

    def _phase(self, seconds: float) -> tuple[Sample, Sample]:
        before = self._sample()
        time.sleep(seconds)
        return before, self._sample()

    def run(self) -> dict[str, Any]:
        try:
            connect = self.start()
            time.sleep(WARMUP)
            self._control(("pause",))
            time.sleep(1.0)  # what was under way lands
            idle = self._phase(IDLE)
            self._control(("resume",))
            time.sleep(1.0)
            before = self._sample()
            arrivals: list[float] = []
            releases: list[float] = []
            missing = 0
            for k in range(MIGRATIONS):
                arr, rel = self.migrate(k)
                arrivals.append(arr)
                if rel is None:
                    missing += 1
                else:
                    releases.append(rel)
                time.sleep(random.uniform(0.2, 0.7))
            after = self._sample()
            self._control(("scale", RATE))
            time.sleep(2.0)
            rate = self._phase(RATE_SECONDS)
            self._control(("scale", 1))
        finally:
            self.stop()
        out = {"n": self.n, "connect": connect, "arrivals": arrivals,
               "releases": releases, "missing": missing,
               "errors": after.errors - before.errors, "watches": int(after.watches),
               "ranges": (after.calls.get("Range", 0) - before.calls.get("Range", 0))
               / (after.t - before.t)}
        for name, (a, b) in {"idle": idle, "load": (before, after), "rate": rate}.items():
            dt = b.t - a.t
            out[name] = {
                "seconds": dt,
                "writes": (b.rev - a.rev) / dt,
                "deliveries": (b.events - a.events) / dt,
                "counts": (b.counts - a.counts) / dt,
                "shared": (b.shared - a.shared) / dt,
                "etcd_cpu": (b.etcd_cpu - a.etcd_cpu) / dt,
                "our_cpu": (b.our_cpu - a.our_cpu) / dt,
            }
        return out
