"""LibvirtSource against a fake `libvirt` module: the cache, its events and
reconnects, without libvirtd (tests/hypervisor has the real daemon)."""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from smtpguard.inventory.identity import Uncovered
from smtpguard.inventory.libvirt import LibvirtSource

DEFINED, UNDEFINED, STARTED, STOPPED = 0, 1, 2, 5
NO_DOMAIN = 42


class LibvirtError(Exception):
    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return str(self)


class Domain:
    def __init__(self, hv: Hypervisor, name: str, uuid: str, nics: dict[str, str],
                 extra: str = "") -> None:
        self.hv, self._name, self.uuid, self.nics, self.running = hv, name, uuid, nics, False
        self.extra = extra  # more <devices> children, as they are in any XML

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self.uuid

    def XMLDesc(self, _flags: int) -> str:
        if self.uuid not in self.hv.domains:
            raise LibvirtError("no domain", NO_DOMAIN)
        nics = "".join(
            f"<interface type='bridge'><mac address='{mac}'/>"
            + (f"<target dev='{dev}'/>" if self.running else "") + "</interface>"
            for dev, mac in self.nics.items())
        ident = " id='1'" if self.running else ""
        return (f"<domain type='qemu'{ident}><name>{self._name}</name><uuid>{self.uuid}</uuid>"
                f"<devices>{nics}{self.extra}</devices></domain>")


class Conn:
    def __init__(self, hv: Hypervisor) -> None:
        self.hv, self.alive, self.closed = hv, True, False
        self.events: dict[int, tuple[int, Callable[..., None]]] = {}
        self.close_cb: Callable[..., None] | None = None

    def registerCloseCallback(self, cb: Callable[..., None], _o: Any) -> None:
        self.close_cb = cb

    def unregisterCloseCallback(self) -> None:
        self.close_cb = None

    def setKeepAlive(self, _i: int, _c: int) -> None:
        pass

    def domainEventRegisterAny(self, _d: Any, ev: int, cb: Callable[..., None],
                               _o: Any) -> int:
        cb_id = len(self.events) + 1
        self.events[cb_id] = (ev, cb)
        return cb_id

    def domainEventDeregisterAny(self, cb_id: int) -> None:
        self.events.pop(cb_id, None)

    def listAllDomains(self, flags: int) -> list[Domain]:
        if not self.alive:
            raise LibvirtError("client socket is closed")
        self.hv.listings += 1
        active_only = flags & 1
        return [d for d in self.hv.domains.values() if d.running or not active_only]

    def isAlive(self) -> int:
        return int(self.alive)

    def close(self) -> int:
        self.closed = True
        return 0


class Hypervisor:
    """Just enough of libvirtd: domains, lifecycle events, dying and coming back."""

    def __init__(self) -> None:
        self.up = True
        self.domains: dict[str, Domain] = {}
        self.conns: list[Conn] = []
        self.listings = 0
        self.wake = threading.Event()

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("libvirt")
        consts = dict(VIR_DOMAIN_EVENT_ID_LIFECYCLE=0, VIR_DOMAIN_EVENT_ID_DEVICE_ADDED=19,
                      VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED=15,
                      VIR_DOMAIN_EVENT_ID_METADATA_CHANGE=23, VIR_DOMAIN_EVENT_STARTED=STARTED,
                      VIR_DOMAIN_EVENT_STOPPED=STOPPED, VIR_ERR_NO_DOMAIN=NO_DOMAIN,
                      VIR_CONNECT_LIST_DOMAINS_ACTIVE=1)
        for k, v in consts.items():
            setattr(mod, k, v)
        mod.libvirtError = LibvirtError  # type: ignore[attr-defined]
        mod.open = self.open  # type: ignore[attr-defined]
        mod.registerErrorHandler = lambda *_a: None  # type: ignore[attr-defined]
        mod.virEventRegisterDefaultImpl = lambda: 0  # type: ignore[attr-defined]
        mod.virEventRunDefaultImpl = self.run_once  # type: ignore[attr-defined]
        mod.virEventAddTimeout = lambda *_a: self.wake.set() or 1  # type: ignore[attr-defined]
        mod.virEventRemoveTimeout = lambda *_a: 0  # type: ignore[attr-defined]
        return mod

    def run_once(self) -> int:
        self.wake.wait(0.05)
        self.wake.clear()
        return 0

    def open(self, _uri: str) -> Conn:
        if not self.up:
            raise LibvirtError("Failed to connect socket to '/var/run/libvirt/libvirt-sock'")
        conn = Conn(self)
        self.conns.append(conn)
        return conn

    def emit(self, ev_id: int, dom: Domain, *args: Any) -> None:
        for conn in self.conns:
            if conn.alive:
                for ev, cb in list(conn.events.values()):
                    if ev == ev_id:
                        cb(conn, dom, *args, None)

    def define(self, name: str, uuid: str, nics: dict[str, str], extra: str = "",
               silent: bool = True) -> Domain:
        dom = Domain(self, name, uuid, nics, extra)
        self.domains[uuid] = dom
        if not silent:
            self.emit(0, dom, DEFINED, 0)
        return dom

    def undefine(self, dom: Domain) -> None:
        del self.domains[dom.uuid]
        self.emit(0, dom, UNDEFINED, 0)

    def start(self, dom: Domain, silent: bool = False) -> None:
        dom.running = True
        if not silent:
            self.emit(0, dom, STARTED, 0)

    def stop(self, dom: Domain, transient: bool = False) -> None:
        dom.running = False
        if transient:  # libvirt forgets a transient domain as it stops
            del self.domains[dom.uuid]
        self.emit(0, dom, STOPPED, 0)

    def die(self) -> None:
        self.up = False
        for conn in self.conns:
            if conn.alive:
                conn.alive = False
                if conn.close_cb is not None:
                    conn.close_cb(conn, 1, None)


U1 = "11111111-1111-1111-1111-111111111111"
U2 = "22222222-2222-2222-2222-222222222222"


def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def hv(monkeypatch: pytest.MonkeyPatch) -> Hypervisor:
    h = Hypervisor()
    monkeypatch.setitem(sys.modules, "libvirt", h.module())
    return h


@pytest.fixture
def source() -> Iterator[LibvirtSource]:
    src = LibvirtSource("test:///fake", retry_initial=0.01, retry_max=0.05)
    yield src
    src.stop()


def test_without_the_module_the_source_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """No python3-libvirt: no exception, no threads, one log line with a hint."""
    monkeypatch.setitem(sys.modules, "libvirt", None)
    src = LibvirtSource()
    with capture_logs() as logs:
        src.start(lambda: None)
    assert not src.available()
    assert src.lookup("vnet0") is None
    src.stop()
    assert [e["event"] for e in logs] == ["inventory.libvirt_unavailable"]
    assert "python3-libvirt" in logs[0]["hint"]


def test_running_domains_map_at_connect(hv: Hypervisor, source: LibvirtSource) -> None:
    """At connect every running domain's taps map to it; a MAC that contradicts
    the cached interface (neither the guest's nor its fe: tap MAC) is a miss."""
    hv.start(hv.define("web1", U1, {"vnet0": "52:54:00:00:00:01"}))
    changes = Changes()
    source.start(changes)
    until(lambda: changes.count == 1)
    assert source.available()
    got = source.lookup("vnet0")
    assert got is not None and (got.id, got.name) == (U1, "web1")
    assert source.lookup("vnet0", "FE:54:00:00:00:01") == got
    assert source.lookup("vnet0", "52:54:00:00:00:01") == got
    assert source.lookup("vnet0", "fe:54:00:00:00:99") is None


def test_a_freed_name_never_follows_to_the_next_domain(hv: Hypervisor,
                                                       source: LibvirtSource) -> None:
    """vnet0 of a stopped domain is forgotten; given to another, it maps there."""
    a = hv.define("a", U1, {"vnet0": "52:54:00:00:00:01"})
    b = hv.define("b", U2, {"vnet0": "52:54:00:00:00:02"})
    changes = Changes()
    source.start(changes)
    until(source.available)
    hv.start(a)
    until(lambda: source.lookup("vnet0") is not None)
    hv.stop(a)
    until(lambda: source.lookup("vnet0") is None)
    hv.start(b)
    until(lambda: source.lookup("vnet0") is not None)
    got = source.lookup("vnet0")
    assert got is not None and got.id == U2
    until(lambda: changes.count == 4)  # connect, a started, a stopped, b started


def test_a_name_taken_over_leaves_the_stale_domain(hv: Hypervisor,
                                                   source: LibvirtSource) -> None:
    """Even with a's stop event lost, b's start moves vnet0 to b, and a later
    refresh of a does not bring vnet0 back to a."""
    a = hv.define("a", U1, {"vnet0": "52:54:00:00:00:01"})
    b = hv.define("b", U2, {"vnet0": "52:54:00:00:00:02"})
    hv.start(a)
    source.start(lambda: None)
    until(source.available)
    a.running = False  # the STOPPED event never came
    hv.start(b)
    until(lambda: (g := source.lookup("vnet0")) is not None and g.id == U2)
    hv.emit(0, a, 4, 0)  # any later event of a refreshes it: inactive, no taps
    hv.emit(0, b, 4, 0)
    until(lambda: hv.listings >= 1)
    time.sleep(0.05)
    got = source.lookup("vnet0")
    assert got is not None and got.id == U2
    assert set(source.snapshot()) == {"vnet0"}


def test_a_miss_refreshes_once_in_the_background(hv: Hypervisor) -> None:
    """A name the cache lacks triggers one full refresh (not one per lookup),
    and on_change tells the agent to look again."""
    now = [0.0]
    src = LibvirtSource("test:///fake", retry_initial=0.01, miss_refresh_after=5.0,
                        clock=lambda: now[0])
    changes = Changes()
    try:
        src.start(changes)
        until(src.available)
        hv.start(hv.define("late", U1, {"vnet7": "52:54:00:00:00:07"}), silent=True)
        listings = hv.listings
        assert src.lookup("vnet7") is None  # answers at once, refreshes behind
        until(lambda: changes.count == 2)
        assert src.lookup("vnet7") is not None
        assert hv.listings == listings + 1
        for _ in range(5):
            assert src.lookup("tap99") is None
        now[0] += 1.0
        assert src.lookup("tap99") is None
        until(lambda: hv.listings == listings + 2)
        time.sleep(0.05)
        assert hv.listings == listings + 2  # rate-limited per name
    finally:
        src.stop()


def test_absent_daemon_then_it_appears(hv: Hypervisor, source: LibvirtSource) -> None:
    """libvirtd absent at start: unavailable, logged once, connects when it comes."""
    hv.up = False
    with capture_logs() as logs:
        changes = Changes()
        source.start(changes)
        time.sleep(0.2)  # several retries
        assert not source.available()
        assert source.lookup("vnet0") is None
        hv.start(hv.define("web1", U1, {"vnet0": "52:54:00:00:00:01"}), silent=True)
        hv.up = True
        until(lambda: changes.count == 1)
    events = [e["event"] for e in logs if e["log_level"] != "debug"]
    assert events == ["inventory.libvirt_unavailable", "inventory.libvirt_connected"]
    assert source.available() and source.lookup("vnet0") is not None


def test_names_survive_an_outage_and_are_refreshed_after(hv: Hypervisor,
                                                         source: LibvirtSource) -> None:
    """While libvirtd is gone the cache stays; after it returns a full refresh
    replaces it and on_change fires."""
    a = hv.define("a", U1, {"vnet0": "52:54:00:00:00:01"})
    hv.start(a)
    changes = Changes()
    source.start(changes)
    until(source.available)
    first = hv.conns[-1]
    hv.die()
    until(lambda: not source.available())
    assert first.closed
    assert source.lookup("vnet0") is not None
    a.running = False
    hv.start(hv.define("b", U2, {"vnet1": "52:54:00:00:00:02"}), silent=True)
    hv.up = True
    until(source.available)
    until(lambda: changes.count == 2)
    assert source.lookup("vnet0") is None
    got = source.lookup("vnet1")
    assert got is not None and got.id == U2


def test_stop_closes_and_ends_threads(hv: Hypervisor) -> None:
    src = LibvirtSource("test:///fake")
    src.start(lambda: None)
    until(src.available)
    src.stop()
    assert hv.conns[-1].closed and not src.available()
    names = {t.name for t in threading.enumerate()}
    assert not names & {"libvirt-source", "libvirt-events"}


VHOSTUSER = ("<interface type='vhostuser'><mac address='52:54:00:00:00:0a'/>"
             "<source type='unix' path='/run/vhu/sock0' mode='client'/></interface>")
HOSTDEV = ("<interface type='hostdev' managed='yes'><mac address='52:54:00:00:00:0b'/>"
           "<source><address type='pci' domain='0x0000' bus='0x03' slot='0x10' "
           "function='0x2'/></source></interface>")


def test_inactive_domains_report_what_bypasses_the_kernel(hv: Hypervisor,
                                                          source: LibvirtSource) -> None:
    """A defined, never started domain with a VF or a vhost-user NIC is
    uncovered from the first refresh; its bridged NIC names no tap."""
    hv.define("dpdk", U1, {"vnet0": "52:54:00:00:00:01"}, extra=VHOSTUSER + HOSTDEV)
    hv.start(hv.define("plain", U2, {"vnet1": "52:54:00:00:00:02"}), silent=True)
    changes = Changes()
    source.start(changes)
    until(lambda: changes.count == 1)
    assert source.uncovered() == [
        Uncovered(U1, "dpdk", "vhost-user", "libvirt", detail="/run/vhu/sock0"),
        Uncovered(U1, "dpdk", "hostdev", "libvirt", detail="0000:03:10.2")]
    assert set(source.snapshot()) == {"vnet1"}


def test_uncovered_follows_define_stop_and_undefine(hv: Hypervisor,
                                                    source: LibvirtSource) -> None:
    """DEFINED adds a domain's bypassing NICs, a stop keeps them (it is still
    defined), UNDEFINED and the stop of a transient domain drop them, and
    each change calls on_change."""
    changes = Changes()
    source.start(changes)
    until(lambda: changes.count == 1)
    assert source.uncovered() == []
    a = hv.define("sriov", U1, {}, extra=HOSTDEV, silent=False)
    until(lambda: len(source.uncovered()) == 1)
    until(lambda: changes.count == 2)  # on_change follows the cache's update
    hv.start(a)
    hv.stop(a)
    time.sleep(0.1)
    assert [u.vm for u in source.uncovered()] == [U1]
    hv.undefine(a)
    until(lambda: source.uncovered() == [])
    until(lambda: changes.count == 3)
    t = hv.define("transient", U2, {"vnet0": "52:54:00:00:00:02"}, extra=VHOSTUSER)
    hv.start(t)
    until(lambda: len(source.uncovered()) == 1 and source.lookup("vnet0") is not None)
    hv.stop(t, transient=True)
    until(lambda: source.uncovered() == [] and source.lookup("vnet0") is None)


def test_uncovered_never_calls_libvirt(hv: Hypervisor, source: LibvirtSource) -> None:
    """uncovered() answers from the cache, also while libvirtd is gone."""
    hv.define("dpdk", U1, {}, extra=VHOSTUSER)
    source.start(lambda: None)
    until(lambda: len(source.uncovered()) == 1)
    hv.die()
    until(lambda: not source.available())
    listings = hv.listings
    assert len(source.uncovered()) == 1
    assert hv.listings == listings
