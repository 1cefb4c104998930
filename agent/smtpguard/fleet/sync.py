"""The fleet's thread: publishes this host's VM records to etcd and brings
in the other hosts' (the agent applies those on its own loop).

    <prefix>/vms/<vm id>     the VM's FleetRecord (JSON), under the writer's
                             record lease (fleet.record_ttl, kept alive): a
                             dead host's records go that long after it
    <prefix>/hosts/<host>    this host's presence, under a short lease

Writes are compare-and-swap on the key's mod_revision: a host only replaces
the record it last saw, so two hosts that decided about one VM while apart
(a partition, etcd down) are resolved by record.FleetRecord's rule, never by
who reconnects first. Changes come in on the watches of what concerns this
host (interest.py, on etcd's gRPC API: the keys of its VMs, the prefixes of
its tenants and of fleet.policy_prefix, all on one stream), each resumed
from the last revision it knew whenever the stream ends, and read again
when that revision was compacted; the writes and leases go on the same gRPC
client. Without aetcd (watch="prefix", prefixwatch.py) the design before
stays: one watch of the whole prefix on the JSON gateway, polled from the
last revision while it does not stream. While etcd is unreachable nothing
here blocks the agent: decisions wait in `pending` (one per VM, the latest)
and go out when it is back.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable

from smtpguard import logs
from smtpguard.fleet.etcd import Etcd, EtcdError, Kv
from smtpguard.fleet.etcdgrpc import GrpcEtcd
from smtpguard.fleet.interest import Interest
from smtpguard.fleet.prefixwatch import PrefixWatches
from smtpguard.fleet.record import FleetRecord
from smtpguard.policy.model import Fleet as FleetPolicy

POLL = 0.5  # seconds between passes (publish, keep alive; read only while no watch streams)
BACKOFF_MAX = 5.0
FETCH_RETRY = 1.0  # seconds without an arrival read after one failed


class FleetSync(PrefixWatches):
    def __init__(self, cfg: FleetPolicy, incoming: Callable[[FleetRecord], None],
                 own: list[FleetRecord], host: str | None = None, poll: float = POLL,
                 etcd: Etcd | None = None,
                 policy: Callable[[list[tuple[str, str]], int], None] | None = None,
                 watch: str = "interest") -> None:
        self.cfg = cfg
        self.host = host or cfg.host or socket.gethostname()
        self.incoming = incoming
        # This host's latest decision per VM (what the store held at start,
        # then each one published): written again whenever etcd lost them.
        self.own: dict[str, FleetRecord] = {r.vm: r for r in own}
        self.poll = poll
        self.log = logs.get(fleet_host=self.host)
        self.pending: dict[str, FleetRecord] = {}
        self.seen: dict[str, int] = {}  # key -> the mod_revision we last saw
        self.rev = 0
        self.lease = 0
        self.host_lease = 0
        self.published = 0
        self.received = 0
        self._next_keepalive = 0.0
        self._next_record_keepalive = 0.0
        self._fetch_retry = 0.0  # no arrival read before (monotonic): one just failed
        # Tenant budgets: what this host counts per tenant (to publish), and
        # what every host last published, tenant -> host -> {attempts, vms, at}.
        self.tenant_out: dict[str, dict[str, object]] = {}
        self.tenants: dict[str, dict[str, dict[str, object]]] = {}
        self.tenant_rev = 0
        self.policy = policy  # called with the policy documents when they change
        self._policy_seen: tuple[tuple[str, int], ...] | None = None
        self.policy_revision = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        # The watches: the prefix's (records, tenants) and the policy's; while
        # one streams its range is not polled.
        self.watching = False
        self.policy_watching = False
        self._resync = False  # the watch's revision was compacted: read everything
        self._policy_dirty = True
        self._policy_rev = 0  # the store's revision at the last policy read
        self._read_lock = threading.Lock()  # records and revisions, from both threads
        # "interest": the keys of this host's VMs and tenants, on etcd's gRPC
        # API (interest.py), with the writes, leases and reads on the same
        # client; "prefix": the whole prefix on the JSON gateway, every change
        # of the fleet (the design before, the fallback without aetcd).
        self.interest: Interest | None = None
        self._watchers: list[threading.Thread] = []
        self.tenant_received: dict[str, int] = {}  # tenant -> counts received from others
        self.etcd: Etcd | GrpcEtcd
        if watch == "interest":
            grpc = etcd if isinstance(etcd, GrpcEtcd) else GrpcEtcd(cfg)
            self.etcd = grpc
            self.interest = Interest(grpc, self._on_kv, self.log, on_delete=self._on_delete,
                                     on_read=self._on_read)
            if cfg.policy_prefix is not None and policy is not None:
                self.interest.set("policy", {cfg.policy_prefix + "/": True})
        else:
            self.etcd = etcd or Etcd(cfg)
            self._watchers.append(threading.Thread(target=self._watch_records,
                                                   name="fleet-watch", daemon=True))
            if cfg.policy_prefix is not None and policy is not None:
                self._watchers.append(threading.Thread(target=self._watch_policy,
                                                       name="fleet-watch-policy", daemon=True))

    def key(self, vm: str) -> str:
        return f"{self.cfg.prefix}/vms/{vm}"

    # -- the agent's side ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        for w in self._watchers:
            w.start()
        if self.interest is not None:
            self.interest.start()

    def stop(self) -> None:
        """Leases are left to run out: the records must outlive a restart."""
        self._stop.set()
        self._wake.set()
        self.etcd.close_watches()
        self._thread.join(5)
        for w in self._watchers:
            w.join(5)
        if self.interest is not None:
            self.interest.stop()

    @property
    def streaming(self) -> bool:
        """Changes come in on the watches now (none is being re-established)."""
        return self.interest.streaming if self.interest is not None else self.watching

    def want(self, vms: Iterable[str], tenants: Iterable[str] = ()) -> None:
        """What this host must hear: these VMs' records (they run here, or it
        holds a decision for them) and these tenants' counts."""
        if self.interest is None:
            return  # the prefix's watch brings everything
        self.interest.set("vms", {self.key(vm): False for vm in vms})
        self.interest.set("tenants", {f"{self.cfg.prefix}/tenants/{t}/": True
                                      for t in tenants})

    def fetch(self, vm: str, timeout: float) -> FleetRecord | None:
        """A VM's record read now (it arrives here: before its first SYN), or
        None (none in etcd, or the prefix's watch brought it). Tried also
        while etcd seemed away (it may just be back), but after a failure
        not again for FETCH_RETRY seconds: VMs arriving during an outage do
        not each wait out the timeout on the agent's loop. EtcdError: not read."""
        if self.interest is None:
            return None
        if time.monotonic() < self._fetch_retry:
            raise EtcdError("etcd read: unreachable a moment ago")
        key = self.key(vm)
        try:
            kvs = self.interest.read_now(key, timeout)
        except EtcdError:
            self._fetch_retry = time.monotonic() + FETCH_RETRY
            raise
        if not kvs:
            return None
        kv = kvs[0]
        with self._read_lock:
            if kv.mod_revision < self.seen.get(key, 0):
                return None  # a later one came on the watch meanwhile
            self.seen[key] = kv.mod_revision
        try:
            return FleetRecord.from_json(kv.value)
        except (ValueError, TypeError) as exc:
            self.log.warning("fleet.bad_record", key=kv.key, error=str(exc))
            return None

    def _on_kv(self, kv: Kv) -> None:
        """A key read or watched for this host's interest."""
        if self._is_policy(kv.key):
            self._policy_changed()
            return
        with self._read_lock:
            if kv.key.startswith(f"{self.cfg.prefix}/vms/"):
                if kv.mod_revision > self.seen.get(kv.key, 0):
                    self._take(kv)
            elif kv.key.startswith(f"{self.cfg.prefix}/tenants/"):
                self._tenant(kv)

    def _on_delete(self, kv: Kv) -> None:
        """A key gone (a record or count with its lease: nothing to undo; a
        policy document removed: read the documents again)."""
        if self._is_policy(kv.key):
            self._policy_changed()

    def _on_read(self, key: str) -> None:
        if self._is_policy(key):
            self._policy_changed()  # read whole: a removal may be among what it missed

    def _is_policy(self, key: str) -> bool:
        return self.cfg.policy_prefix is not None and key.startswith(self.cfg.policy_prefix + "/")

    def _policy_changed(self) -> None:
        self._policy_dirty = True
        self._wake.set()

    def publish(self, rec: FleetRecord) -> None:
        with self._lock:
            self.own[rec.vm] = rec
            self.pending[rec.vm] = rec
        self._wake.set()

    def share_tenant(self, tenant: str, counts: dict[str, object]) -> None:
        """This host's count for a tenant's budget (written on the next pass)."""
        with self._lock:
            self.tenant_out[tenant] = counts
        self._wake.set()

    def tenant_counts(self, tenant: str) -> dict[str, dict[str, object]]:
        with self._lock:
            return dict(self.tenants.get(tenant, {}))

    def queued(self) -> int:
        with self._lock:
            return len(self.pending)

    # -- the thread ------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.poll
        while not self._stop.is_set():
            self._wake.clear()  # before the work: a publish() during it wakes the next wait
            try:
                if not self.lease:
                    self._connect()
                self._keepalive()
                self._publish()
                self._share()
                self._read()
                backoff = self.poll
            except EtcdError as exc:
                if backoff == self.poll:  # once an outage, not once a retry
                    self.log.warning("fleet.unavailable", error=str(exc), queued=self.queued(),
                                     hint="enforcing and deciding locally; publishing later")
                backoff = min(max(backoff * 2, 0.5), BACKOFF_MAX)
            except Exception as exc:  # a bug here must not end the thread
                self.log.error("fleet.failed", error=str(exc))
                self.log.debug("fleet.failed", exc_info=True)
                backoff = BACKOFF_MAX
            self._wake.wait(backoff)

    def _connect(self) -> None:
        lease = self.etcd.grant(self.cfg.record_ttl)
        self.host_lease = self.etcd.grant(self.cfg.host_ttl)
        rev = self.etcd.put(f"{self.cfg.prefix}/hosts/{self.host}",
                            json.dumps({"host": self.host, "since": time.time()}),
                            self.host_lease)
        # The whole prefix only without interest (then every record comes in
        # anyway); with it, each key is read when it is first watched, and a
        # record of ours meets the fleet's at its compare-and-swap.
        kvs: list[Kv] = []
        if self.interest is None:
            rev, kvs = self.etcd.range(f"{self.cfg.prefix}/vms/")
        known: dict[str, FleetRecord] = {}
        for kv in kvs:
            rec = self._take(kv)
            if rec is not None:
                known[rec.vm] = rec
        # What this host decided while it was not connected (or before it
        # first was) goes out unless the fleet knows of something later.
        with self._lock:
            own = list(self.own.values())
        for rec in own:
            have = known.get(rec.vm)
            if have is None or (rec.newer_than(have.since, have.host)
                                and not rec.same_decision(have)):
                with self._lock:
                    self.pending.setdefault(rec.vm, rec)
        self.rev = rev
        self.lease = lease
        self._next_keepalive = time.monotonic() + self.cfg.host_ttl / 3
        self._next_record_keepalive = time.monotonic() + self.cfg.record_ttl / 3
        self.log.info("fleet.connected", revision=rev, records=len(kvs),
                      queued=self.queued(), prefix=self.cfg.prefix)

    def _take(self, kv: Kv) -> FleetRecord | None:
        """A record read from etcd: remembered, and handed in if another host wrote it."""
        self.seen[kv.key] = kv.mod_revision
        try:
            rec = FleetRecord.from_json(kv.value)
        except (ValueError, TypeError) as exc:
            self.log.warning("fleet.bad_record", key=kv.key, error=str(exc))
            return None
        if rec.host != self.host:
            self.received += 1
            self.incoming(rec)
        return rec

    def _keepalive(self) -> None:
        """The presence lease every host_ttl/3; the records' (a day by default)
        every record_ttl/3, and whenever the presence lease was gone (etcd
        lost its leases, or we were away that long): at 10,000 hosts a
        keepalive of both every 10 s would be 2,000 requests a second."""
        now = time.monotonic()
        records_due = now >= self._next_record_keepalive
        if now >= self._next_keepalive:
            if not self.etcd.keepalive(self.host_lease):
                records_due = True
                self.host_lease = self.etcd.grant(self.cfg.host_ttl)
                self.etcd.put(f"{self.cfg.prefix}/hosts/{self.host}",
                              json.dumps({"host": self.host, "since": time.time()}),
                              self.host_lease)
            self._next_keepalive = time.monotonic() + self.cfg.host_ttl / 3
        if records_due:
            self._keepalive_records()

    def _keepalive_records(self) -> None:
        if not self.etcd.keepalive(self.lease):
            # Gone with our records (etcd lost it while we were away): they
            # are written again, from what this host holds.
            self.lease = self.etcd.grant(self.cfg.record_ttl)
            self.seen.clear()
            with self._lock:
                for rec in self.own.values():
                    self.pending.setdefault(rec.vm, rec)
            self.log.warning("fleet.lease_renewed", queued=self.queued())
        self._next_record_keepalive = time.monotonic() + self.cfg.record_ttl / 3

    def _publish(self) -> None:
        with self._lock:
            todo = list(self.pending.values())
        for rec in todo:
            key = self.key(rec.vm)
            done, rev, now = self.etcd.put_if(key, rec.to_json(), self.lease,
                                              self.seen.get(key, 0))
            if done:
                self.seen[key] = rev
                self.published += 1
                self._done(rec)
                continue
            self.seen[key] = now.mod_revision if now is not None else 0
            other = FleetRecord.from_json(now.value) if now is not None else None
            if other is not None and (other.newer_than(rec.since, rec.host)
                                      or other == rec):
                self._done(rec)  # a later decision was made elsewhere: it stands
                with self._lock:
                    if self.own.get(rec.vm) == rec:
                        del self.own[rec.vm]
                if other.host != self.host:
                    self.received += 1
                    self.incoming(other)
            # else: ours is the later one; the next pass writes over what we saw now

    def _done(self, rec: FleetRecord) -> None:
        with self._lock:
            if self.pending.get(rec.vm) == rec:
                del self.pending[rec.vm]

    def _share(self) -> None:
        with self._lock:
            out, self.tenant_out = self.tenant_out, {}
        for tenant, counts in out.items():
            try:
                self.etcd.put(f"{self.cfg.prefix}/tenants/{tenant}/{self.host}",
                              json.dumps(counts), self.host_lease)
            except EtcdError:
                with self._lock:
                    self.tenant_out.setdefault(tenant, counts)
                raise

    def _tenant(self, kv: Kv) -> None:
        tenant, _, host = kv.key[len(f"{self.cfg.prefix}/tenants/"):].rpartition("/")
        try:
            counts = json.loads(kv.value)
        except ValueError:
            return
        with self._lock:
            self.tenants.setdefault(tenant, {})[host] = counts
            if host != self.host:
                self.tenant_received[tenant] = self.tenant_received.get(tenant, 0) + 1

    def _read_tenants(self) -> None:
        rev, kvs = self.etcd.range(f"{self.cfg.prefix}/tenants/", self.tenant_rev + 1)
        for kv in kvs:
            self._tenant(kv)
        self.tenant_rev = max(self.tenant_rev, rev)

    def _read_policy(self) -> None:
        """The documents under fleet.policy_prefix, whole (they are few), handed
        on when any changed, came or went; their revision is the newest
        mod_revision among them (or the store's, after a deletion)."""
        assert self.cfg.policy_prefix is not None and self.policy is not None
        self._policy_dirty = False  # before the read: an event during it reads again
        try:
            rev, kvs = self.etcd.range(self.cfg.policy_prefix + "/")
        except EtcdError:
            self._policy_dirty = True  # the next pass reads again
            raise
        self._policy_rev = max(self._policy_rev, rev)
        seen = tuple(sorted((kv.key, kv.mod_revision) for kv in kvs))
        if seen == self._policy_seen:
            return
        self._policy_seen = seen
        newest = max((kv.mod_revision for kv in kvs), default=0)
        self.policy_revision = newest if newest > self.policy_revision else rev
        docs = [(f"etcd:{kv.key}", kv.value.decode(errors="replace"))
                for kv in sorted(kvs, key=lambda kv: kv.key)]
        self.policy(docs, self.policy_revision)

    def _read(self) -> None:
        """What the watches would have brought, read instead while they do not
        stream (and everything after a compaction)."""
        # With interest the policy prefix's watch replays what it missed (and a
        # compaction reads it whole, _on_read): read only when told. The
        # gateway's watch: also while it does not stream.
        watched = self.interest is not None or self.policy_watching
        if self.cfg.policy_prefix is not None and self.policy is not None and (
                self._policy_dirty or not watched):
            self._read_policy()
        if self.interest is not None or (self.watching and not self._resync):
            return  # interest.py resumes its watches itself
        with self._read_lock:
            if self._resync:
                self._resync = False
                self.rev = self.tenant_rev = 0
            if self.cfg.tenant_budget is not None:
                self._read_tenants()
            rev, kvs = self.etcd.range(f"{self.cfg.prefix}/vms/", self.rev + 1)
            for kv in kvs:
                if kv.mod_revision > self.seen.get(kv.key, 0):
                    self._take(kv)
            self.rev = max(self.rev, rev)
