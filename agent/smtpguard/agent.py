"""The long-lived agent: keep the classifier on every VM-facing interface and
report what it counts."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, cast

from smtpguard import logs, operator_api
from smtpguard.control import ControlServer
from smtpguard.datapath import attach, linkdump, trip
from smtpguard.datapath.attachment import Attachment, attachment, swapped
from smtpguard.datapath.doorbell import Doorbell
from smtpguard.datapath.interfaces import LinkEvent, LinkMonitor, dump_links
from smtpguard.datapath.loader import CACHE_DIR, Datapath, Sizes, ensure_bpffs
from smtpguard.datapath.snapshot import Snapshot, take
from smtpguard.defaults import DEFAULT_METRICS, DEFAULT_PIN_DIR, DEFAULT_SOCKET, DEFAULT_STATE_DIR
from smtpguard.detect.engine import Detector
from smtpguard.enforce.keeper import Keeper
from smtpguard.errors import AttachError, SmtpguardError
from smtpguard.inventory import migrate
from smtpguard.inventory.hook import HookSource
from smtpguard.inventory.identity import Uncovered
from smtpguard.inventory.resolve import Resolver
from smtpguard.inventory.vmiface import VmIface
from smtpguard.metrics import DatapathCollector, EnforcementCollector, Health, serve
from smtpguard.policy import LoadedPolicy, Policy, load_path
from smtpguard.policy.membership import facts_of, place
from smtpguard.policy.watch import PolicyWatcher
from smtpguard.respond import Responder
from smtpguard.sdnotify import Notifier
from smtpguard.trip_metrics import TripCollector

POLL = 0.25  # the longest the loop sleeps (it also wakes on events, commands, the bell)
FILTER_CHECK = 10.0  # how often the filters enforcement depends on are checked


@dataclass
class AgentConfig:
    policy_path: Path | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    pin_dir: Path = DEFAULT_PIN_DIR
    bpffs: Path = Path("/sys/fs/bpf")
    metrics_addr: str | None = DEFAULT_METRICS
    tick: float = 1.0
    log_interval: float = 60.0
    sizes: Sizes = field(default_factory=Sizes)
    enforce: bool = True
    control_socket: Path | None = DEFAULT_SOCKET
    # Detection runs when the classifier rings (counts changed; see
    # datapath/doorbell.py), at most every 2x its last duration, never less
    # than wake_gap apart, and at least every detect_interval (windows age,
    # blocks expire).
    detect_interval: float = 1.0
    wake_gap: float = 0.01
    backend: str | None = None  # auto, nftables, iptables; None: the policy's


class Agent:
    """Discovery, attachment and reporting; everything in the kernel outlives it."""

    def __init__(self, cfg: AgentConfig, loaded: LoadedPolicy,
                 clock: Callable[[], float] = time.monotonic,
                 datapath: Datapath | None = None) -> None:
        self.cfg = cfg
        self.loaded = loaded
        self.generation = 1
        self.reloads = {"applied": 0, "rejected": 0}
        self.clock = clock
        self._watcher: PolicyWatcher | None = None
        self.keeper: Keeper | None = None
        self.responder: Responder | None = None
        self.unattached: set[int] = set()
        self.notifier = Notifier()
        self.control: ControlServer | None = None
        self.commands: queue.Queue[tuple[dict[str, Any], Future[dict[str, Any]]]] = queue.Queue()
        self.fleet: Any = None  # fleet.link.FleetLink, with a fleet section
        self._next_detect = 0.0
        self._earliest_detect = 0.0
        self._bell: Doorbell | None = None
        self._listener: threading.Thread | None = None
        # Possibly prepared already (compiling while the CLI imported us).
        self.datapath = datapath or Datapath(cfg.pin_dir, cfg.sizes,
                                             cache_dir=cfg.state_dir / CACHE_DIR)
        self.log = logs.get()
        # Replaced, never mutated: the metrics thread reads it without a lock.
        self.ifaces: Mapping[int, VmIface] = {}
        self._ipr: Any = None
        self._monitor = LinkMonitor()
        self.hook = HookSource()  # what libvirt's qemu hook announced (inventory/hook.py)
        self.resolver = Resolver([self.hook])
        self.names: dict[str, str] = {}  # vm id -> its name when last seen (status, CLI)
        self._link_kinds: dict[int, str] = {}  # ifindex -> IFLA_INFO_KIND, every link
        self._uncovered_said: set[tuple[str, str]] = set()  # (vm, reason) logged
        self._reidentify = threading.Event()  # a source's mappings changed
        self._forget: set[int] = set()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._last_logged: dict[int, tuple[int, ...]] = {}
        self._next_log = 0.0
        self._next_filter_check = 0.0
        self.metrics_server: Any = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        from pyroute2 import IPRoute

        self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ensure_bpffs(self.cfg.bpffs)
        self.datapath.load()
        self._bell = self.datapath.doorbell()
        self._listener = threading.Thread(target=self._listen, name="doorbell", daemon=True)
        self._listener.start()
        self._apply_datapath_policy()
        self._start_inventory()
        self._monitor.start()  # subscribe before the dump: nothing falls between
        self._ipr = IPRoute()
        self.reconcile()
        collectors: list[Any] = [DatapathCollector(
            self.snapshot, lambda: self.ifaces, lambda: self.datapath.loaded, self.health,
            self.datapath.fill, lambda: self.policy),
            TripCollector(lambda: self.datapath.table("smtp_trip"))]
        if self.cfg.enforce:
            from smtpguard.enforce.select import construct

            requested = self.cfg.backend or self.policy.enforcement.backend
            enforcer = construct(requested)  # type: ignore[arg-type]
            self.log.info("enforce.backend", backend=enforcer.name, requested=requested)
            self.keeper = Keeper(enforcer, self.policy, self.clock)
            # Read before the datapath's counters in each scrape: a SYN is
            # counted (tc ingress) before nftables can reject it, so rejections
            # read first never outnumber the attempts read after them.
            collectors.insert(0, EnforcementCollector(self.keeper.enforcer, lambda: self.ifaces,
                                                      self.keeper, collectors[0].activity))
        self.responder = Responder(
            self.cfg.state_dir, self.policy, self.datapath.table("smtp_stats"),
            self.datapath.table("smtp_dests"), self.keeper, lambda: self.ifaces,
            lambda: self.generation, self.clock, recent_table=self.datapath.table("smtp_recent"),
            loaded=lambda: self.loaded)
        # Armed afresh by the first detection step (below), from the records:
        # nothing of an earlier run's wires is trusted.
        trip.disarm_all(self.datapath.table("smtp_trip"))
        if self.responder.store is not None:
            migrate.to_ids(self.responder.store, self.ifaces.values(), self.policy.interfaces)
        stored = self.responder.load() and bool(self.responder.detector.records)
        if self.keeper is not None:
            from smtpguard.enforce.select import remove_other_real

            # The VMs' records are the truth; the kernel is adopted only
            # without a store that knows any VM (none, unreadable, or new).
            self.keeper.start(self.ifaces, self.responder.actions_in_force() if stored else None)
            # Only once this backend enforces: if it cannot, the start fails
            # with the other one's enforcement still in the kernel.
            remove_other_real(self.keeper.enforcer.name)
            self._apply_datapath_policy()  # the trip wire, now that the tables are there
        self.responder.start()
        if self.policy.fleet is not None:
            from smtpguard.fleet.link import FleetLink

            self.fleet = FleetLink(self.policy.fleet, self.responder,
                                   lambda: self._monitor.events.put(None), lambda: self.ifaces,
                                   self.cfg.state_dir, self._fleet_policy_changed)
            collectors.append(self.fleet.collector())
            if self.fleet.policy_docs()[0]:
                self.reload()  # the fleet's policy as last seen, before etcd answers
            self.fleet.start()
        if self.cfg.metrics_addr:
            self.metrics_server = serve(self.cfg.metrics_addr, *collectors)
            host, port = self.metrics_server.server_address[:2]
            self.log.info("metrics.serving", addr=host, port=port)
        if self.cfg.policy_path is not None:
            self._watcher = PolicyWatcher(self.cfg.policy_path, self._reload.set)
            try:
                self._watcher.start()
            except OSError as exc:
                self._watcher = None
                self.log.warning("policy.watch_unavailable", error=str(exc),
                                 hint="reload with SIGHUP")
        if self.cfg.control_socket is not None:
            self.control = ControlServer(self.cfg.control_socket, self.submit)
            self.control.start()
        self._next_log = self.clock() + self.cfg.log_interval
        # One detection step before READY: the VMs here now have their trip
        # wires armed (datapath/trip.py) by the time systemd says started.
        self.responder.detect()
        self.notifier.ready(f"{len(self.ifaces)} VM interfaces")
        self.log.info("agent.started", interfaces=len(self.ifaces),
                      pin_dir=str(self.cfg.pin_dir), policy=self._policy_name(),
                      policy_digest=self.loaded.digest, policy_generation=self.generation)

    @property
    def policy(self) -> Policy:
        return self.loaded.policy

    def _policy_name(self) -> str:
        return str(self.cfg.policy_path) if self.cfg.policy_path else "built-in default"

    def run(self) -> None:
        """Until SIGTERM/SIGINT; SIGHUP reloads the policy."""
        self.start()
        try:
            while not self._stop.is_set():
                self.step()
        finally:
            self.shutdown()

    def install_signals(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            self._stop.set()

        def hup(signum: int, _frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def shutdown(self) -> None:
        """Log final counts and let go; filters and pinned maps stay in the kernel."""
        self.notifier.stopping()
        try:
            self.log_counts(final=True)
        except Exception:
            self.log.debug("agent.final_counts_failed", exc_info=True)
        if self.control is not None:
            self.control.stop()
        self.resolver.stop()
        if self.fleet is not None:
            self.fleet.stop()
        if self.responder is not None:
            self.responder.stop()
        if self._watcher is not None:
            self._watcher.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self._bell is not None:
            bell, self._bell = self._bell, None
            if self._listener is not None:
                self._listener.join(2 * POLL)
            bell.close()
        self.datapath.close()
        self.log.info("agent.stopped", interfaces=len(self.ifaces))

    # -- the loop ----------------------------------------------------------
    def step(self) -> None:
        """Handle link events as they come; housekeeping once a tick."""
        deadline = self.clock() + self.cfg.tick
        while not self._stop.is_set():
            timeout = deadline - self.clock()
            if timeout <= 0:
                break
            self._serve_commands()
            if self.fleet is not None:
                self.fleet.serve()
            self._detect()
            try:
                ev = self._monitor.events.get(timeout=self._wait(timeout))
            except queue.Empty:
                ev = None
            if ev is None:  # a wake-up (the doorbell, a command) or a timeout
                if self._reload.is_set():
                    break
                if self._reidentify.is_set():
                    self._reidentify.clear()
                    before = self.ifaces
                    self.reconcile()  # who is behind each interface, asked again
                    if self.ifaces is not before:
                        self._enforce_vms()
                continue
            before = self.ifaces
            self.on_link(ev)
            self._drain_links()  # a burst (VMs starting, our own attaches) is one update
            if self.ifaces is not before:
                self._enforce_vms()
        if self._reload.is_set():
            self._reload.clear()
            self.reload()
        self.notifier.watchdog(self._healthy())
        try:
            self._sweep()
            self._say_uncovered()
            self._check_filters()
            if self.keeper is not None:
                self.keeper.flush()  # retries a class update that failed
            if self.keeper is not None and self.keeper.repair() and self.responder:
                self.responder.reassert()
            if self.clock() >= self._next_log:
                self._next_log = self.clock() + self.cfg.log_interval
                self.log_counts()
        except Exception as exc:
            # Housekeeping failing must not take the agent (and its
            # attachment of new interfaces) down with it.
            self.log.error("agent.housekeeping_failed", error=str(exc))
            self.log.debug("agent.housekeeping_failed", exc_info=True)

    def _wait(self, timeout: float) -> float:
        """How long the loop may sleep: until the tick ends, the next periodic
        detection, or, with the bell rung while detection was held back, the
        earliest it may run again; at most POLL (signals, reloads)."""
        now = self.clock()
        wait = min(timeout, POLL)
        if self.responder is not None:
            wait = min(wait, self._next_detect - now)
            if self._bell is not None and self._bell.pending():
                wait = min(wait, self._earliest_detect - now)
        return max(wait, 0.001)

    def _listen(self) -> None:
        """The doorbell's thread: a record in the ring wakes the loop."""
        while not self._stop.is_set():
            bell = self._bell  # shutdown() clears it, then joins us
            if bell is None:
                return
            if bell.wait(POLL):
                self._monitor.events.put(None)

    def _detect(self) -> None:
        """Detection when the classifier rang or detect_interval passed. A busy
        host (the bell ringing all the time) gets at most a third of a CPU."""
        if self.responder is None:
            return
        now = self.clock()
        if now < self._next_detect and not (
                now >= self._earliest_detect and self._bell is not None and self._bell.rung()):
            return
        # The wall clock with `now`, before the step: an expiry that falls
        # during the step, after the step's own clock, is still ahead of it
        # (asked after the step, it was past and a block ended an interval late).
        wall = time.time()
        self.responder.detect()
        took = self.clock() - now
        self._next_detect = now + self.cfg.detect_interval
        end = self.responder.detector.next_expiry(wall)
        if end is not None:  # a block ends on time, not up to an interval late
            self._next_detect = min(self._next_detect, now + (end - wall) + 0.001)
        self._earliest_detect = now + took + max(self.cfg.wake_gap, 2 * took)

    # -- the control socket --------------------------------------------------
    def submit(self, req: dict[str, Any]) -> dict[str, Any]:
        """Called on the control thread: run `req` on the main loop, wait."""
        fut: Future[dict[str, Any]] = Future()
        self.commands.put((req, fut))
        self._monitor.events.put(None)  # wake the loop
        return fut.result(timeout=30)

    def _serve_commands(self) -> None:
        while True:
            try:
                req, fut = self.commands.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(operator_api.handle(self, req))
            except Exception as exc:
                fut.set_exception(exc)

    def _healthy(self) -> bool:
        """The loop runs, the classifier is loaded, detection stepped lately."""
        r = self.responder
        fresh = r is None or r.last_loop == 0 or time.time() - r.last_loop < 10
        return self.datapath.loaded and fresh

    def _enforce_vms(self) -> None:
        if self.keeper is None:
            return
        try:
            self.keeper.ifaces_changed(self.ifaces)
            self.keeper.flush()
        except SmtpguardError as exc:
            # The interface is still covered by the default class (wildcards).
            self.log.error("enforce.update_failed", error=str(exc))

    def _fleet_policy_changed(self) -> None:  # on the fleet's thread
        self._reload.set()
        self._monitor.events.put(None)

    def reload(self) -> None:
        """Swap in the policy on disk (and the fleet's, from etcd) if it is
        valid; keep the running one if not."""
        docs, revision = self.fleet.policy_docs() if self.fleet is not None else ([], 0)
        try:
            loaded = load_path(self.cfg.policy_path, docs)
        except SmtpguardError as exc:
            self.reloads["rejected"] += 1
            self.log.error("policy.rejected", policy=self._policy_name(),
                           errors=str(exc).splitlines(), policy_generation=self.generation,
                           kept_digest=self.loaded.digest)
            return
        if self.keeper is not None and self.cfg.backend is None and \
                loaded.policy.enforcement.backend != self.policy.enforcement.backend:
            self.log.warning("enforce.backend_unchanged", running=self.keeper.enforcer.name,
                             requested=loaded.policy.enforcement.backend,
                             hint="the backend is chosen at start: restart to switch")
        if loaded.policy.fleet != self.policy.fleet:
            self.log.warning("fleet.unchanged", hint="the fleet section is read at start: "
                             "restart to join, leave or change it")
        inventory_changed = loaded.policy.inventory != self.policy.inventory
        self.loaded = loaded
        # With the fleet's policy: its etcd revision (the same on every host).
        self.generation = revision if revision > self.generation else self.generation + 1
        self.reloads["applied"] += 1
        if self.fleet is not None and docs:
            self.fleet.accepted(docs, revision)
        self._apply_datapath_policy()
        if inventory_changed:
            self._start_inventory()
        self.reconcile()
        if self.keeper is not None:
            self.keeper.policy_changed(self.policy, self.ifaces)
        if self.responder is not None:
            self.responder.configure(self.policy)
        self.log.info("policy.reloaded", policy=self._policy_name(), digest=loaded.digest,
                      policy_generation=self.generation, interfaces=len(self.ifaces))

    def _apply_datapath_policy(self) -> None:
        self.datapath.set_ports(self.policy.smtp_ports)
        self.datapath.set_no_answer(self.policy.datapath.no_answer_after)
        self.datapath.set_slot_offset(0)  # the kernel's clock as it is (tests move it)
        # Marked SYNs are rejected by the nftables tables' rule only (see
        # datapath/trip.py); with no such rule there is nothing to mark for.
        nft = self.keeper is not None and self.keeper.enforcer.name == "nftables"
        self.datapath.set_trip_mark(self.policy.datapath.trip_mark if nft else 0)
        if self.responder is not None:
            self.responder.trips = self.datapath.table("smtp_trip") if nft else None

    # -- identity ----------------------------------------------------------
    def _start_inventory(self) -> None:
        """The policy's identity sources (libvirt, Proxmox), started and given
        a few seconds to say what they know before the first dump."""
        from smtpguard.inventory.sources import from_policy

        self.resolver.stop()
        self.resolver = Resolver([self.hook, *from_policy(self.policy.inventory)])
        self.resolver.start(self._identities_changed)
        self.resolver.wait_settled(5.0)

    def _identities_changed(self) -> None:
        """From a source's thread: look every interface up again, soon."""
        self._reidentify.set()
        self._monitor.events.put(None)

    def announce(self, op: str, xml: str) -> dict[str, Any]:
        """libvirt's hook (on the main loop): name the domain's taps now and
        put its state on them before the hook returns and QEMU starts."""
        taps = self.hook.announce(op, xml)
        self._drain_links()
        present = {link.name: link for link in linkdump.dump()}
        for t in taps:
            if t in present:
                link = present[t]
                self.on_link(LinkEvent("new", link.index, t, link.alias, link.master, link.kind))
        self._enforce_vms()
        vifs = [v for v in self.ifaces.values() if v.ifname in taps]
        return {"ok": True, "interfaces": sorted(v.ifname for v in vifs),
                "vm": vifs[0].vm if vifs else None,
                "state": self.detector.record(vifs[0].vm).state
                if vifs and self.detector is not None else None}

    def _drain_links(self) -> None:
        """Handle the link events already queued (a burst; a tap's NEWLINK)."""
        while True:
            try:
                ev = self._monitor.events.get_nowait()
            except queue.Empty:
                return
            if ev is not None:
                self.on_link(ev)

    # -- interfaces --------------------------------------------------------
    def reconcile(self) -> None:
        """Match the kernel to the interfaces now present: attach where the
        policy says, detach our filters elsewhere, forget what vanished."""
        links = dump_links()
        present = {ev.ifindex for ev in links}
        # Masters first: a tap's attachment is its master's kind.
        self._link_kinds = {ev.ifindex: ev.link_kind for ev in links}
        for ev in links:
            self.on_link(ev)
        gone = set(self.ifaces) - present
        for ifindex in gone:
            self._drop(ifindex, "vanished")
        # Counters of interfaces that vanished while no agent ran (keys only:
        # no need to decode every sketch here).
        try:
            known = {k.ifindex for k in self.datapath.table("smtp_stats").keys()}
            known |= {k.value for k in self.datapath.table("smtp_dests").keys()}
            self._forget |= known - present
        except Exception:
            self.log.debug("agent.snapshot_failed", exc_info=True)

    def on_link(self, ev: LinkEvent) -> None:
        if ev.kind == "del":
            self._link_kinds.pop(ev.ifindex, None)
            self.unattached.discard(ev.ifindex)
            if ev.ifindex in self.ifaces:
                self._drop(ev.ifindex, "vanished")
            return
        self._link_kinds[ev.ifindex] = ev.link_kind
        pats = self.policy.interfaces
        vif = self.resolver.identify(ev.ifindex, ev.ifname, ev.ifalias, pats.patterns,
                                     pats.vm_from_ifalias)
        if vif is not None:
            said = next((p.attachment for p in pats.patterns if p.pattern == vif.pattern),
                        "auto")
            vif = replace(vif, attachment=self._attachment(ev) if said == "auto"
                          else cast(Attachment, said))
        known = self.ifaces.get(ev.ifindex)
        if vif is None:
            if known is not None or attach.ours(self._ipr, ev.ifindex):
                self._detach(ev.ifindex, ev.ifname)
                if known is not None:
                    self._drop(ev.ifindex, "no longer matches")
            return
        if known == vif:
            return
        log = self.log.bind(vm=vif.vm, interface=vif.ifname)
        try:
            attach.attach(self._ipr, vif.ifindex, vif.ifname, self.datapath.ingress_fd,
                          self.datapath.egress_fd, swapped(vif.attachment))
        except AttachError as exc:
            # One interface's failure never stops the others.
            log.error("iface.attach_failed", error=str(exc))
            self.unattached.add(vif.ifindex)
            return
        self.unattached.discard(vif.ifindex)
        self.ifaces = {**self.ifaces, vif.ifindex: vif}
        self.names[vif.vm] = vif.display
        placed = place(self.policy, facts_of(vif.vm, [vif]))
        log.info("iface.attached", ifindex=vif.ifindex, pattern=vif.pattern,
                 attachment=vif.attachment,
                 renamed=known is not None, tenant=vif.tenant, vm_class=placed.cls,
                 name=vif.display, source=vif.source, uuid=vif.uuid,
                 previous_vm=None if known is None or known.vm == vif.vm else known.vm)

    def _attachment(self, ev: LinkEvent) -> Attachment:
        """How the device is plugged in, from its kind and its master's."""
        if not ev.master:
            return attachment(ev.link_kind, None)
        if ev.master not in self._link_kinds:  # a master we have not heard of yet
            self._link_kinds.update((link.index, link.kind) for link in linkdump.dump())
        return attachment(ev.link_kind, self._link_kinds.get(ev.master, ""))

    def _detach(self, ifindex: int, ifname: str) -> None:
        try:
            attach.detach(self._ipr, ifindex, ifname)
        except AttachError as exc:
            self.log.error("iface.detach_failed", interface=ifname, error=str(exc))

    def _drop(self, ifindex: int, reason: str) -> None:
        self.unattached.discard(ifindex)
        vif = self.ifaces.get(ifindex)
        self.ifaces = {k: v for k, v in self.ifaces.items() if k != ifindex}
        self._forget.add(ifindex)
        self._last_logged.pop(ifindex, None)
        if vif is not None:
            self.log.info("iface.detached", vm=vif.vm, interface=vif.ifname, reason=reason)

    def _check_filters(self) -> None:
        """Every 10 s, put back the classifier where enforcement needs it: on
        a macvtap the netdev table only marks what it refuses and the
        classifier drops it (enforce/render.py), so a filter deleted behind
        our back would let the VM through while status says blocked."""
        if self.clock() < self._next_filter_check or self._ipr is None:
            return
        self._next_filter_check = self.clock() + FILTER_CHECK
        for vif in list(self.ifaces.values()):
            if not swapped(vif.attachment):
                continue
            if attach.ours(self._ipr, vif.ifindex) == {"ingress", "egress"}:
                continue
            try:
                attach.attach(self._ipr, vif.ifindex, vif.ifname, self.datapath.ingress_fd,
                              self.datapath.egress_fd, True)
            except AttachError as exc:
                self.log.error("iface.attach_failed", vm=vif.vm, interface=vif.ifname,
                               error=str(exc))
                continue
            self.log.warning("iface.repaired", vm=vif.vm, interface=vif.ifname,
                             attachment=vif.attachment,
                             hint="our tc filter was removed behind our back; put back")

    def _sweep(self) -> None:
        if not self._forget:
            return
        doomed, self._forget = self._forget, set()
        doomed -= set(self.ifaces)
        removed = self.datapath.forget(doomed)
        self.log.debug("datapath.forgotten", interfaces=sorted(doomed), entries=removed)

    # -- reporting ---------------------------------------------------------
    @property
    def detector(self) -> Detector | None:
        return None if self.responder is None else self.responder.detector

    def health(self) -> Health:
        states: dict[str, str] = {v.vm: "ok" for v in self.ifaces.values()}
        r = self.responder
        uncovered: dict[str, int] = {}
        for u in self.uncovered():
            uncovered[u.reason] = uncovered.get(u.reason, 0) + 1
        unenforced: dict[str, int] = {}
        for v in self.ifaces.values():
            if self.keeper is not None and not self.keeper.reaches(v):
                unenforced[v.attachment] = unenforced.get(v.attachment, 0) + 1
        if r is None:
            return Health(self.generation, dict(self.reloads), states,
                          unattached=len(self.unattached), uncovered=uncovered,
                          unenforced=unenforced)
        states.update({rec.vm: rec.state for rec in r.detector.records.values()
                       if rec.state != "ok" or rec.vm in states})
        return Health(self.generation, dict(self.reloads), states, dict(r.actions_total),
                      (tuple(r.loop_buckets), r.loop_sum, r.loop_n), r.last_loop,
                      len(self.unattached), uncovered, unenforced)

    def uncovered(self) -> list[Uncovered]:
        """VMs the hypervisor runs here whose traffic never crosses the host
        kernel (nothing to count or enforce: say so, never skip in silence);
        one with an interface we do see is covered there and not listed."""
        seen = {v.vm for v in self.ifaces.values()}
        return [u for u in self.resolver.uncovered() if u.vm not in seen]

    def _say_uncovered(self) -> None:
        """Log each uncovered VM once (per reason) while it is there."""
        now = {(u.vm, u.reason): u for u in self.uncovered()}
        for key in sorted(set(now) - self._uncovered_said):
            u = now[key]
            self.log.warning("vm.uncovered", vm=u.vm, name=u.name, reason=u.reason,
                             source=u.source, detail=u.detail,
                             hint="its traffic bypasses the host kernel: nothing is "
                             "counted or enforced for it on this host")
        self._uncovered_said = set(now)

    def snapshot(self) -> Snapshot:
        return take(self.datapath.table("smtp_stats"), self.datapath.table("smtp_dests"))

    def log_counts(self, final: bool = False) -> None:
        """One vm.counts event per interface whose counters moved (all at exit)."""
        snap = self.snapshot()
        for ifindex, vif in sorted(self.ifaces.items()):
            s = snap.ifaces.get(ifindex)
            if s is None:
                continue
            key = tuple(c.attempts + c.completed + c.reset + c.no_answer
                        for c in s.ports.values())
            if not final and self._last_logged.get(ifindex) == key:
                continue
            self._last_logged[ifindex] = key
            self.log.info(
                "vm.counts", vm=vif.vm, interface=vif.ifname, final=final,
                attempts={str(p): c.attempts for p, c in sorted(s.ports.items())},
                completed=sum(c.completed for c in s.ports.values()),
                reset=sum(c.reset for c in s.ports.values()),
                no_answer=sum(c.no_answer for c in s.ports.values()),
                destinations=dict(s.destinations),
            )


def cleanup(cfg: AgentConfig) -> int:
    """Remove every filter we own in this network namespace and our pinned maps."""
    from pyroute2 import IPRoute

    log = logs.get()
    removed = 0
    with IPRoute() as ipr:
        for ev in dump_links():
            if attach.ours(ipr, ev.ifindex):
                attach.detach(ipr, ev.ifindex, ev.ifname)
                removed += 1
                log.info("iface.detached", interface=ev.ifname, reason="cleanup")
    Datapath(cfg.pin_dir, cfg.sizes).unpin()
    tables = chains = False
    if cfg.enforce:
        from smtpguard.enforce.desired import Capabilities
        from smtpguard.enforce.iptables import IptablesEnforcer
        from smtpguard.enforce.nftables import NftablesEnforcer
        from smtpguard.errors import BackendUnavailable

        # Both backends: whichever ran here. Neither creates what is not there.
        try:
            tables = NftablesEnforcer(Capabilities()).remove()
        except BackendUnavailable as exc:
            log.info("cleanup.skipped", backend="nftables", reason=str(exc))
        try:
            chains = IptablesEnforcer().remove()
        except BackendUnavailable as exc:
            log.info("cleanup.skipped", backend="iptables", reason=str(exc))
    log.info("agent.cleaned_up", interfaces=removed, pin_dir=str(cfg.pin_dir),
             nft_tables_removed=tables, iptables_chains_removed=chains)
    return removed
