"""The long-lived agent: keep the classifier on every VM-facing interface and
report what it counts."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from types import FrameType
from typing import Any

from smtpguard import logs
from smtpguard.api import commands as api_commands
from smtpguard.api.control import ControlServer
from smtpguard.daemon.links import Links
from smtpguard.daemon.reload import Reloading
from smtpguard.daemon.report import Reporting
from smtpguard.daemon.sdnotify import Notifier
from smtpguard.daemon.state import AgentConfig
from smtpguard.datapath import trip
from smtpguard.datapath.doorbell import Doorbell
from smtpguard.datapath.interfaces import LinkMonitor
from smtpguard.datapath.loader import CACHE_DIR, Datapath, ensure_bpffs
from smtpguard.enforce.keeper import Keeper
from smtpguard.inventory import migrate
from smtpguard.inventory.hook import HookSource
from smtpguard.inventory.resolve import Resolver
from smtpguard.inventory.vmiface import VmIface
from smtpguard.observe.datapath_metrics import DatapathCollector
from smtpguard.observe.enforcement_metrics import EnforcementCollector
from smtpguard.observe.metrics import serve
from smtpguard.observe.trip_metrics import TripCollector
from smtpguard.policy import LoadedPolicy
from smtpguard.policy.watch import PolicyWatcher
from smtpguard.respond.responder import Responder

POLL = 0.25  # the longest the loop sleeps (it also wakes on events, commands, the bell)

__all__ = ["Agent", "AgentConfig"]


class Agent(Links, Reloading, Reporting):
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

    # -- lifecycle ------------------------------------------------------------
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

    # -- the loop -------------------------------------------------------------
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

    # -- the control socket ---------------------------------------------------
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
                fut.set_result(api_commands.handle(self, req))
            except Exception as exc:
                fut.set_exception(exc)
