"""The simulated fleet of bench/fleet.py in the design before issue 27 (every
host watches the fleet's whole prefix, on the JSON gateway): n real FleetSync
agents in this process under one key prefix, their steady load of
re-publications, and the migrations whose arrival at every other host is
timed."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

from etcdserver import EtcdServer
from smtpguard.fleet.record import FleetRecord
from smtpguard.fleet.sync import FleetSync
from smtpguard.policy.model import Fleet as FleetPolicy

VMS = 5  # records per host
REPUBLISH = 5.0  # seconds between a host's re-publications (one VM each)
MIGRATIONS = 20
WARMUP = 3.0  # seconds of steady load before measuring
TIMEOUT = 10.0  # a migration not seen by a host this long after: counted as missing


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
        # Today's design before issue 27: every host watches the whole prefix
        # on the JSON gateway (FleetSync's "prefix" watch, the fallback now).
        self.syncs = [FleetSync(FleetPolicy(endpoints=(etcd.url,), prefix=self.prefix, host=h),
                                self._incoming(h), [], host=h, watch="prefix")
                      for h in self.hosts]
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
