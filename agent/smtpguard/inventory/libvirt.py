"""Identity from libvirt: which running domain each host tap belongs to.

LibvirtSource keeps a cache ifname -> Identity built from every running
domain's live XML, and keeps it current from libvirt's domain events
(lifecycle, device added/removed, metadata changed). It also keeps, for every
defined domain (running or not), its interfaces that bypass the host kernel
(vhost-user, hostdev, vDPA: domxml.uncovered), for
uncovered(). lookup() and uncovered() only read the cache: libvirt's API
blocks while a domain is starting (its object is locked, also while the qemu
hook runs), so nothing the agent calls may wait on it.
One worker thread does every libvirt call in order; libvirt's default event
loop runs in a thread of its own (libvirt_binding.py).

libvirtd may be absent or restart: the worker reconnects with backoff, the
cache is kept while disconnected (a stopped libvirtd starts no domain, so no
tap name is handed out again meanwhile), and each (re)connect is followed by a
full refresh and on_change. A lookup with a MAC that contradicts the cached
interface is a miss, which covers the moment between libvirtd handing a name
out again and the refresh.

The Python binding is Debian's python3-libvirt, imported only in start(); without
it the source is unavailable and the agent names VMs by interface.
"""

from __future__ import annotations

import importlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import logs
from . import domxml
from .identity import Identity, Uncovered
from .libvirt_binding import CLOSE_REASONS, EVENT_LOOP, error_text, missing_socket, quietly

HINT = "install Debian's python3-libvirt (the venv sees system site-packages)"

_Task = tuple[Any, ...]


class LibvirtSource:
    """IdentitySource for libvirt domains (qemu:///system by default)."""

    name = "libvirt"

    def __init__(self, uri: str = "qemu:///system", *, retry_initial: float = 0.5,
                 retry_max: float = 10.0, miss_refresh_after: float = 5.0,
                 keepalive: tuple[int, int] = (5, 3),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.uri = uri
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._miss_after = miss_refresh_after
        self._keepalive = keepalive
        self._clock = clock
        self._log = logs.get(source="libvirt", uri=uri)
        self._lock = threading.Lock()
        self._by_dom: dict[str, dict[str, Identity]] = {}
        self._by_if: dict[str, Identity] = {}
        self._uncovered: dict[str, list[Uncovered]] = {}  # domain UUID -> its bypassing NICs
        self._missed: dict[str, float] = {}
        self._full_pending = False
        self._tasks: queue.Queue[_Task] = queue.Queue()
        self._lv: Any = None
        self._conn: Any = None
        self._connected = False
        self._callbacks: list[int] = []
        self._on_change: Callable[[], None] = lambda: None
        self._worker: threading.Thread | None = None
        self._said_unavailable = False
        # Set once the first connection attempt is over (connected and
        # refreshed, or failed): the agent's start waits on it, so a VM's
        # interface is not named by its vnetN for a moment.
        self.settled = threading.Event()

    # -- IdentitySource ---------------------------------------------------

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._tasks = queue.Queue()
        try:
            # Any: the binding has no stubs, and mypy reads its module oddly.
            libvirt: Any = importlib.import_module("libvirt")
        except ImportError:
            self._log.warning("inventory.libvirt_unavailable",
                              reason="python module libvirt is missing", hint=HINT)
            self.settled.set()
            return
        self._lv = libvirt
        # libvirt prints every error to stderr unless told otherwise; we log.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        EVENT_LOOP.acquire(libvirt)
        self._worker = threading.Thread(target=self._run, name="libvirt-source", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        if self._worker is None:
            return
        self._tasks.put(("stop",))
        self._worker.join(timeout=10)
        self._worker = None
        EVENT_LOOP.release(self._lv)

    def available(self) -> bool:
        return self._connected

    def lookup(self, ifname: str, mac: str | None = None) -> Identity | None:
        with self._lock:
            found = self._by_if.get(ifname)
            if found is not None and (mac is None or _mac_matches(found, mac)):
                return found
            now = self._clock()
            if self._connected and now - self._missed.get(ifname, -1e18) >= self._miss_after:
                self._missed[ifname] = now
                if not self._full_pending:
                    self._full_pending = True
                    self._tasks.put(("full", self._conn))
            return None

    def uncovered(self) -> list[Uncovered]:
        """Every defined domain's interfaces that bypass the host kernel."""
        with self._lock:
            return [u for uuid in sorted(self._uncovered) for u in self._uncovered[uuid]]

    def snapshot(self) -> dict[str, Identity]:
        """Every interface the source knows now (for status and tests)."""
        with self._lock:
            return dict(self._by_if)

    # -- the worker: every libvirt call happens here, in order --------------

    def _run(self) -> None:
        lv = self._lv
        delay = self._retry_initial
        while True:
            if self._conn is None:
                try:
                    self._connect()
                    delay = self._retry_initial
                except Exception as exc:  # libvirtError, or a bug: retry either way
                    self.settled.set()
                    self._disconnect()
                    if not self._said_unavailable:
                        self._said_unavailable = True
                        self._log.warning("inventory.libvirt_unavailable",
                                          reason=error_text(exc), retry_in=delay)
                    else:
                        self._log.debug("inventory.libvirt_retry", reason=error_text(exc))
                    if self._wait_stop(delay):
                        break
                    delay = min(delay * 2, self._retry_max)
                    continue
            task = self._tasks.get()
            if task[0] == "stop":
                break
            try:
                self._handle(task)
            except lv.libvirtError as exc:
                self._failed(task, exc)
            except Exception:  # a bug here must not end the watching
                self._log.exception("inventory.libvirt_task_failed", task=task[0])
        self._disconnect()

    def _wait_stop(self, timeout: float) -> bool:
        """Sleep until timeout or stop(); tasks meanwhile are moot (a full
        refresh follows the connect)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                task = self._tasks.get(timeout=left)
            except queue.Empty:
                return False
            if task[0] == "stop":
                return True
        return False

    def _connect(self) -> None:
        lv = self._lv
        missing = missing_socket(self.uri)
        if missing is not None:
            # No daemon to talk to: a stat, not a connection attempt, until
            # its socket appears (libvirt's client sets itself up lazily on
            # a first open, which a host without libvirtd need not pay).
            raise ConnectionRefusedError(f"no libvirt socket at {missing}")
        conn = lv.open(self.uri)
        self._conn = conn
        # How a lost libvirtd is noticed at once (EOF) or when it hangs
        # (keepalive); daemonless drivers such as test:/// need neither.
        try:
            conn.registerCloseCallback(self._closed, None)
        except lv.libvirtError as exc:
            self._log.debug("inventory.libvirt_no_close_callback", reason=error_text(exc))
        try:
            conn.setKeepAlive(*self._keepalive)
        except lv.libvirtError as exc:
            self._log.debug("inventory.libvirt_no_keepalive", reason=error_text(exc))
        events = [("VIR_DOMAIN_EVENT_ID_LIFECYCLE", self._ev_lifecycle),
                  ("VIR_DOMAIN_EVENT_ID_DEVICE_ADDED", self._ev_domain),
                  ("VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED", self._ev_domain),
                  ("VIR_DOMAIN_EVENT_ID_METADATA_CHANGE", self._ev_domain)]
        for const, cb in events:
            event_id = getattr(lv, const, None)
            if event_id is not None:
                self._callbacks.append(conn.domainEventRegisterAny(None, event_id, cb, None))
        # Events first, then the full picture: nothing falls between the two.
        self._full_refresh(conn)
        self._connected = True
        self._said_unavailable = False
        with self._lock:
            domains, ifaces = len(self._by_dom), len(self._by_if)
        self._log.info("inventory.libvirt_connected", domains=domains, interfaces=ifaces)
        self.settled.set()
        self._changed()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._connected = False
        callbacks, self._callbacks = self._callbacks, []
        with self._lock:
            self._full_pending = False
        if conn is None:
            return
        for cb_id in callbacks:
            quietly(conn.domainEventDeregisterAny, cb_id)
        quietly(conn.unregisterCloseCallback)
        quietly(conn.close)

    def _handle(self, task: _Task) -> None:
        kind, conn = task[0], task[1]
        if conn is not self._conn:
            return  # from a connection since lost; its reconnect refreshed all
        if kind == "lost":
            self._log.warning("inventory.libvirt_disconnected", reason=task[2])
            self._disconnect()
        elif kind == "full":
            if self._full_refresh(conn):
                self._changed()
        elif kind == "drop":
            if self._replace(task[2], {}):
                self._changed()
        elif kind in ("domain", "config"):
            # config (after a stop, whose "drop" let the taps go without a
            # call): only what bypasses the kernel is read again, never taps;
            # a domain gone (transient, undefined) keeps neither.
            dom = task[2]
            try:
                xml = dom.XMLDesc(0)
            except self._lv.libvirtError as exc:
                if exc.get_error_code() != self._lv.VIR_ERR_NO_DOMAIN:
                    raise
                xml = None
            uuid = dom.UUIDString().lower()
            found, bypass = self._parse(dom.name(), xml) if xml is not None else ({}, [])
            changed = self._set_uncovered(uuid, bypass)
            if kind == "domain":
                changed = self._replace(uuid, found) or changed
            if changed:
                self._changed()

    def _failed(self, task: _Task, exc: Any) -> None:
        conn = self._conn
        if conn is not None and quietly(conn.isAlive) != 1:
            self._log.warning("inventory.libvirt_disconnected", reason=error_text(exc))
            self._disconnect()
        else:
            self._log.warning("inventory.libvirt_call_failed", task=task[0],
                              reason=error_text(exc))

    def _full_refresh(self, conn: Any) -> bool:
        lv = self._lv
        with self._lock:
            self._full_pending = False
            now = self._clock()
            self._missed = {i: t for i, t in self._missed.items() if now - t < self._miss_after}
        fresh: dict[str, dict[str, Identity]] = {}
        bypass: dict[str, list[Uncovered]] = {}
        # Every defined domain (flags 0): inactive ones only for what
        # bypasses the kernel, from their persistent XML.
        for dom in conn.listAllDomains(0):
            try:
                xml = dom.XMLDesc(0)
            except lv.libvirtError as exc:
                if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                    continue  # gone since the listing
                raise
            uuid = dom.UUIDString().lower()
            found, nics = self._parse(dom.name(), xml)
            if found:
                fresh[uuid] = found
            if nics:
                bypass[uuid] = nics
        with self._lock:
            before = (self._by_if, self._uncovered)
            self._by_dom = fresh
            self._by_if = {i: ident for ifs in fresh.values() for i, ident in ifs.items()}
            self._uncovered = bypass
            return before != (self._by_if, self._uncovered)

    def _parse(self, domain: str, xml: str) -> tuple[dict[str, Identity], list[Uncovered]]:
        """(taps of a running domain, interfaces that bypass the kernel)."""
        try:
            taps = domxml.interfaces(xml) if domxml.is_running(xml) else {}
            return taps, domxml.uncovered(xml)
        except domxml.DomainXmlError as exc:
            self._log.warning("inventory.libvirt_bad_xml", domain=domain, reason=str(exc))
            return {}, []

    def _set_uncovered(self, uuid: str, found: list[Uncovered]) -> bool:
        with self._lock:
            if self._uncovered.get(uuid, []) == found:
                return False
            if found:
                self._uncovered[uuid] = found
            else:
                self._uncovered.pop(uuid, None)
            return True

    def _replace(self, uuid: str, found: dict[str, Identity]) -> bool:
        """Set one domain's interfaces; a name it now holds leaves any other."""
        with self._lock:
            old = self._by_dom.get(uuid, {})
            if old == found and all(self._by_if.get(i) == v for i, v in found.items()):
                return False
            for ifname in old:
                if ifname not in found and self._by_if.get(ifname, None) == old[ifname]:
                    del self._by_if[ifname]
            for ifname, ident in found.items():
                prior = self._by_if.get(ifname)
                if prior is not None and prior.id != uuid:
                    others = self._by_dom.get(prior.id, {})
                    others.pop(ifname, None)
                    if not others:
                        self._by_dom.pop(prior.id, None)
                self._by_if[ifname] = ident
            if found:
                self._by_dom[uuid] = found
            else:
                self._by_dom.pop(uuid, None)
            return True

    def _changed(self) -> None:
        try:
            self._on_change()
        except Exception:  # the agent's problem, not a reason to stop watching
            self._log.exception("inventory.on_change_failed")

    # -- libvirt callbacks (event-loop thread): only enqueue ----------------

    def _closed(self, conn: Any, reason: int, _opaque: Any) -> None:
        self._tasks.put(("lost", conn, CLOSE_REASONS.get(reason, str(reason))))

    def _ev_lifecycle(self, conn: Any, dom: Any, event: int, _detail: int,
                      _opaque: Any) -> None:
        if event == self._lv.VIR_DOMAIN_EVENT_STOPPED:
            self._tasks.put(("drop", conn, dom.UUIDString().lower()))
            self._tasks.put(("config", conn, dom))
        else:
            self._tasks.put(("domain", conn, dom))

    def _ev_domain(self, conn: Any, dom: Any, *_rest: Any) -> None:
        self._tasks.put(("domain", conn, dom))


def _mac_matches(ident: Identity, mac: str) -> bool:
    """The tap's MAC (fe:...) or the guest's both say it is this interface."""
    guest = ident.facts.get("mac")
    if guest is None:
        return True
    mac = mac.lower()
    return mac in (guest, domxml.tap_mac(guest))
