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

import base64
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from smtpguard import logs
from smtpguard.fleet.etcd import Etcd
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import POLL, FleetSync
from smtpguard.policy.model import Fleet as FleetPolicy
from table import Row, pct

SECTION = "9 fleet"
BIG, SMALL = 200, 20
PAPER = 1000  # hosts, extrapolated
VMS = 5  # records per host
REPUBLISH = 5.0  # seconds between a host's re-publications (one VM each)
MIGRATIONS = 20
WARMUP = 3.0  # seconds of steady load before measuring
TIMEOUT = 10.0  # a migration not seen by a host this long after: counted as missing
PROBES = 300  # empty polls per prefix size, agents gone
ETCD = "/usr/bin/etcd"


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EtcdServer:
    """One etcd member on loopback, its data in a temporary directory; gone
    (process and directory) when the `with` ends, also on failure."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="smtpguard-bench-etcd-"))
        client, peer = _free_ports(2)
        self.url = f"http://127.0.0.1:{client}"
        self.peer = f"http://127.0.0.1:{peer}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EtcdServer:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        with open(self.dir / "etcd.log", "wb") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "bench", "--data-dir", str(self.dir / "member"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
                 "--initial-cluster", f"bench={self.peer}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - before any thread
        deadline = time.monotonic() + 30
        while True:
            try:
                self.revision()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.dir / "etcd.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"etcd did not start: {tail}") from None
                time.sleep(0.2)

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/v3{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            reply: dict[str, Any] = json.loads(r.read())
            return reply

    def revision(self) -> int:
        """The store's revision (maintenance status: not counted as a Range)."""
        return int(self._post("/maintenance/status", {})["header"]["revision"])

    def calls(self) -> dict[str, float]:
        """etcd's own count of gRPC calls handled, by method (the JSON gateway's too)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("grpc_server_handled_total{"):
                labels, value = line[len("grpc_server_handled_total{"):].rsplit("} ", 1)
                method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
                out[method] = out.get(method, 0.0) + float(value)
        return out

    def cpu(self) -> float:
        """CPU seconds etcd has used."""
        assert self.proc is not None
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def fill(self, prefix: str, n: int, value: str) -> None:
        """n records under prefix, 100 puts a transaction."""
        for i in range(0, n, 100):
            self._post("/kv/txn", {"success": [
                {"request_put": {"key": base64.b64encode(f"{prefix}/vm{j}".encode()).decode(),
                                 "value": base64.b64encode(value.encode()).decode()}}
                for j in range(i, min(n, i + 100))]})


class Sample:
    """Counters at one moment, for rates over a window."""

    def __init__(self, etcd: EtcdServer, syncs: list[FleetSync]) -> None:
        self.t = time.monotonic()
        self.rev = etcd.revision()
        self.calls = etcd.calls()
        self.etcd_cpu = etcd.cpu()
        self.our_cpu = time.process_time()
        self.published = sum(s.published for s in syncs)
        self.received = sum(s.received for s in syncs)
        self.errors = sum(sum(s.etcd.errors.values()) for s in syncs)
        self.rewatch = sum(s.etcd.errors["watch"] for s in syncs)


class SimFleet:
    """n FleetSync agents under one prefix, their steady load, the migrations."""

    def __init__(self, etcd: EtcdServer, n: int) -> None:
        self.etcd = etcd
        self.n = n
        self.prefix = f"/smtpguard-bench/{uuid.uuid4().hex[:8]}/n{n}"
        self.hosts = [f"host{i:04d}" for i in range(n)]
        self.watch: dict[str, float] = {}  # migration VM -> its blocked record's since
        self.seen: dict[str, dict[str, float]] = {}  # migration VM -> host -> when seen
        self.syncs = [FleetSync(FleetPolicy(endpoints=(etcd.url,), prefix=self.prefix, host=h),
                                self._incoming(h), [], host=h) for h in self.hosts]
        self.by_host = dict(zip(self.hosts, self.syncs, strict=True))
        self._stop = threading.Event()
        self.loaded = 0

    def _incoming(self, host: str) -> Any:
        def saw(rec: FleetRecord) -> None:
            if rec.state == "blocked" and self.watch.get(rec.vm) == rec.since:
                self.seen[rec.vm].setdefault(host, time.monotonic())
        return saw

    def key(self, vm: str) -> str:
        return f"{self.prefix}/vms/{vm}"

    def start(self) -> float:
        """All agents connected: seconds it took."""
        t0 = time.monotonic()
        for s in self.syncs:
            s.start()
        while not all(s.lease for s in self.syncs):
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"{sum(not s.lease for s in self.syncs)} of {self.n} "
                                   "agents did not connect to etcd in 120 s")
            time.sleep(0.1)
        return time.monotonic() - t0

    def seed(self) -> None:
        """Every host's 5 VMs, and the migration VMs on their first hosts."""
        now = time.time()
        for h, s in self.by_host.items():
            for j in range(VMS):
                s.publish(FleetRecord(f"{h}-vm{j}", h, since=now))
        for k in range(MIGRATIONS):
            h = self.hosts[(k * 7) % self.n]
            self.by_host[h].publish(FleetRecord(f"mig{k}", h, since=now))
        deadline = time.monotonic() + 60
        while any(s.queued() for s in self.syncs) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Every host has the others' records (one process reads all 200 hosts'
        # watches: the seeding's ~200,000 deliveries take it seconds, a
        # backlog no real host, one process each, has).
        mig = [self.hosts[(k * 7) % self.n] for k in range(MIGRATIONS)]
        want = {h: VMS * (self.n - 1) + sum(1 for m in mig if m != h) for h in self.hosts}
        while any(s.received < want[h] for h, s in self.by_host.items()):
            if time.monotonic() > deadline:
                raise RuntimeError("the seeded records did not reach every host in 60 s")
            time.sleep(0.1)

    def _load(self) -> None:
        """One host re-publishes one of its VMs every REPUBLISH / n seconds."""
        every = REPUBLISH / self.n
        order = list(range(self.n))
        random.shuffle(order)
        nxt = time.monotonic()
        i = 0
        while not self._stop.is_set():
            h = self.hosts[order[i % self.n]]
            vm = f"{h}-vm{(i // self.n) % VMS}"
            self.by_host[h].publish(FleetRecord(vm, h, since=time.time(),
                                                reason=f"load {i}"))
            self.loaded += 1
            i += 1
            nxt += every
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def migrate(self, k: int) -> tuple[list[float], int]:
        """Host B publishes mig<k> blocked: seconds until each other host had
        it, and how many never did within TIMEOUT."""
        vm = f"mig{k}"
        a = self.hosts[(k * 7) % self.n]
        b = random.choice([h for h in self.hosts if h != a])
        since = time.time()
        self.seen[vm] = {}
        self.watch[vm] = since
        rec = FleetRecord(vm, b, state="blocked", since=since, until=since + 3600,
                          reason="bench: moved here, blocked", actor="auto", blocks=(since,))
        t0 = time.monotonic()
        self.by_host[b].publish(rec)
        others = self.n - 1
        while len(self.seen[vm]) < others and time.monotonic() - t0 < TIMEOUT:
            time.sleep(0.01)
        got = dict(self.seen[vm])
        return [t - t0 for t in got.values()], others - len(got)

    def run(self) -> dict[str, Any]:
        connect = self.start()
        try:
            self.seed()
            loader = threading.Thread(target=self._load, name="bench-load", daemon=True)
            loader.start()
            time.sleep(WARMUP)
            before = Sample(self.etcd, self.syncs)
            delays: list[float] = []
            lasts: list[float] = []
            missing = 0
            for k in range(MIGRATIONS):
                d, miss = self.migrate(k)
                delays += d
                missing += miss
                lasts.append(max(d) if not miss else TIMEOUT)
                time.sleep(random.uniform(0.2, 0.7))
            after = Sample(self.etcd, self.syncs)
            watching = sum(1 for s in self.syncs if s.watching)
            self._stop.set()
            loader.join(5)
        finally:
            for s in self.syncs:
                s.stop()
        dt = after.t - before.t
        ranges = after.calls.get("Range", 0) - before.calls.get("Range", 0)
        txns = after.calls.get("Txn", 0) - before.calls.get("Txn", 0)
        published = after.published - before.published
        return {
            "received": (after.received - before.received) / dt, "watching": watching,
            "rewatch": after.rewatch - before.rewatch,
            "n": self.n, "connect": connect, "seconds": dt,
            "writes": (after.rev - before.rev) / dt, "published": published / dt,
            "conflicts": txns - published, "ranges": ranges / dt,
            "etcd_cpu": (after.etcd_cpu - before.etcd_cpu) / dt,
            "our_cpu": (after.our_cpu - before.our_cpu) / dt,
            "delays": delays, "lasts": lasts, "missing": missing,
            "errors": after.errors - before.errors,
            "errors_all": sum(sum(s.etcd.errors.values()) for s in self.syncs),
        }


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
