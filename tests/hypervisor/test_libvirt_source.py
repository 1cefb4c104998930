"""LibvirtSource against a real libvirtd (the kit's private instance, QEMU/TCG):
which domain a tap belongs to, through starts, name reuse, metadata changes
and libvirtd going away; and what libvirt's qemu hook sees, for the agent's
"before the first packet" question."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import guest
import pytest
from libvirtd import Domain, Libvirtd
from pyroute2 import IPRoute
from structlog.testing import capture_logs

from smtpguard.daemon.netns import run_in
from smtpguard.inventory import domxml
from smtpguard.inventory.identity import Identity
from smtpguard.inventory.libvirt import LibvirtSource

HOOK = """#!/bin/sh
# Written by test_libvirt_source.py: what each qemu hook phase sees.
out=/var/log/libvirt/hook
cat > "$out-$2.xml"
echo "$1 $2 $(ls /sys/class/net | tr '\\n' ' ')" >> "$out.log"
exit 0
"""


class Changes:
    """on_change, counted."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def until(cond: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def maps_to(src: LibvirtSource, ifname: str, vm: Domain) -> Callable[[], bool]:
    def check() -> bool:
        got = src.lookup(ifname)
        return got is not None and got.name == vm.name

    return check


def link_mac(hv: Libvirtd, ifname: str) -> str:
    def mac() -> str:
        with IPRoute() as ipr:
            [index] = ipr.link_lookup(ifname=ifname)
            return str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS"))

    return run_in(hv.netns, mac)


@pytest.fixture
def g(hv: Libvirtd) -> guest.Guest:
    return guest.build()


@pytest.fixture
def watched(hv: Libvirtd) -> Iterator[tuple[LibvirtSource, Changes]]:
    """A started source on the kit's libvirtd, connected."""
    src = LibvirtSource(hv.uri, retry_initial=0.1, retry_max=0.5)
    changes = Changes()
    src.start(changes)
    try:
        until(lambda: src.available() and changes.count >= 1, "the source to connect")
        yield src, changes
    finally:
        src.stop()


def define(hv: Libvirtd, g: guest.Guest, vm: str, metadata: str = "") -> Domain:
    return hv.define(vm, g, guest.cmdline(ctl=False), metadata=metadata)


def reconnected(hv: Libvirtd, src: LibvirtSource, changes: Changes) -> None:
    """Restart libvirtd and wait until the source has refreshed after it."""
    before = changes.count
    hv.restart_libvirtd()
    until(lambda: src.available() and changes.count > before, "the source to reconnect")


def test_started_domain_maps_to_its_uuid_name_and_tenant(
        hv: Libvirtd, g: guest.Guest, watched: tuple[LibvirtSource, Changes]) -> None:
    """A started domain's tap maps to the domain's UUID, name and metadata
    tenant/class as soon as libvirt says it started (its event, not a
    refresh a lookup's miss asks for); the tap's own MAC (fe:...) confirms
    it, a different MAC does not."""
    src, _ = watched
    vm = define(hv, g, "ls1", domxml.metadata_xml("acme", "trusted"))
    try:
        vm.start()
        [vnet] = vm.vnets()
        # snapshot() asks for nothing, as lookup() does on a miss: only the
        # domain's started event can bring the tap in.
        until(lambda: vnet in src.snapshot(), f"{vnet} to map by libvirt's event")
        assert src.snapshot()[vnet].name == vm.name
        got = src.lookup(vnet, link_mac(hv, vnet))
        assert got == Identity(
            id=vm.uuid.lower(), name=vm.name, source="libvirt", tenant="acme", cls="trusted",
            uuid=vm.uuid.lower(),
            facts={"domain": vm.name, "uuid": vm.uuid.lower(), "mac": vm.macs[0]})
        assert link_mac(hv, vnet) == domxml.tap_mac(vm.macs[0])
        assert src.lookup(vnet, "fe:00:00:00:00:01") is None
    finally:
        vm.undefine()


def test_restart_moves_the_vm_and_frees_the_old_name(
        hv: Libvirtd, g: guest.Guest, watched: tuple[LibvirtSource, Changes]) -> None:
    """destroy + start: the old tap name no longer maps to the VM, the new one
    does, with the same id."""
    src, _ = watched
    vm = define(hv, g, "ls2")
    try:
        vm.start()
        [first] = vm.vnets()
        until(maps_to(src, first, vm), f"{first} to map")
        uuid = vm.uuid.lower()
        vm.destroy()
        until(lambda: src.lookup(first) is None, f"{first} to be forgotten", timeout=5)
        vm.start()
        [second] = vm.vnets()
        assert second != first
        until(maps_to(src, second, vm), f"{second} to map", timeout=5)
        got = src.lookup(second)
        assert got is not None and got.id == uuid
        assert src.lookup(first) is None
    finally:
        vm.undefine()


def test_live_metadata_change_updates_the_tenant(
        hv: Libvirtd, g: guest.Guest, watched: tuple[LibvirtSource, Changes]) -> None:
    """Setting smtpguard's metadata on a running domain changes its tenant and
    class without a restart (METADATA_CHANGE), and on_change says so."""
    import libvirt

    src, changes = watched
    vm = define(hv, g, "ls3", domxml.metadata_xml("acme"))
    try:
        vm.start()
        [vnet] = vm.vnets()
        until(maps_to(src, vnet, vm), f"{vnet} to map")
        before = changes.count
        vm.dom().setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                             "<vm><tenant>globex</tenant><class>bulk</class></vm>",
                             domxml.PREFIX, domxml.NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE)

        def updated() -> bool:
            got = src.lookup(vnet)
            return got is not None and (got.tenant, got.cls) == ("globex", "bulk")

        until(updated, "the new tenant", timeout=5)
        until(lambda: changes.count > before, "on_change", timeout=5)
    finally:
        vm.undefine()


def test_a_freed_vnet_name_maps_to_the_next_domain_given_it(
        hv: Libvirtd, g: guest.Guest, watched: tuple[LibvirtSource, Changes]) -> None:
    """libvirt hands vnetN out again (its counter starts over when libvirtd
    restarts with no domain running): the name then maps to the domain that
    has it now, never to the one that had it before."""
    src, changes = watched
    a, b = define(hv, g, "ls4a"), define(hv, g, "ls4b")
    try:
        reconnected(hv, src, changes)
        a.start()
        [name] = a.vnets()
        until(maps_to(src, name, a), f"{name} to map to a")
        a.destroy()
        until(lambda: src.lookup(name) is None, f"{name} to be forgotten", timeout=5)
        reconnected(hv, src, changes)
        b.start()
        assert b.vnets() == [name], "libvirt did not hand the name out again"
        until(maps_to(src, name, b), f"{name} to map to b", timeout=5)
        got = src.lookup(name)
        assert got is not None and got.id == b.uuid.lower() != a.uuid.lower()
    finally:
        a.undefine()
        b.undefine()


def test_libvirtd_restart_keeps_names_and_reconnects(
        hv: Libvirtd, g: guest.Guest, watched: tuple[LibvirtSource, Changes]) -> None:
    """While libvirtd is down the source says unavailable but keeps what it
    knew; when libvirtd is back it reconnects by itself, refreshes, calls
    on_change, and follows events again."""
    src, changes = watched
    vm, late = define(hv, g, "ls5"), define(hv, g, "ls5b")
    try:
        vm.start()
        [vnet] = vm.vnets()
        until(maps_to(src, vnet, vm), f"{vnet} to map")
        before = changes.count
        hv.stop_libvirtd()
        until(lambda: not src.available(), "the source to notice", timeout=10)
        assert maps_to(src, vnet, vm)()
        hv.start_libvirtd()
        until(lambda: src.available() and changes.count > before, "the reconnect")
        assert maps_to(src, vnet, vm)()
        late.start()
        [other] = late.vnets()
        until(maps_to(src, other, late), f"{other} to map after the restart", timeout=5)
        assert maps_to(src, vnet, vm)()
    finally:
        vm.undefine()
        late.undefine()


def test_absent_libvirtd_at_start_then_it_comes(hv: Libvirtd, g: guest.Guest) -> None:
    """libvirtd absent when the source starts: no exception, unavailable, no
    answers, one log line; it connects once libvirtd runs."""
    hv.stop_libvirtd()
    src = LibvirtSource(hv.uri, retry_initial=0.1, retry_max=0.5)
    changes = Changes()
    vm: Domain | None = None
    try:
        with capture_logs() as logs:
            src.start(changes)
            until(lambda: any(e["event"] == "inventory.libvirt_unavailable" for e in logs),
                  "the unavailable log line", timeout=10)
            assert not src.available()
            assert src.lookup("vnet0") is None
            time.sleep(0.6)  # a few retries, still logged once
            hv.start_libvirtd()
            until(lambda: src.available() and changes.count >= 1, "the connect")
        said = [e["event"] for e in logs if e["log_level"] != "debug"]
        assert said == ["inventory.libvirt_unavailable", "inventory.libvirt_connected"]
        vm = define(hv, g, "ls6")
        vm.start()
        [vnet] = vm.vnets()
        until(maps_to(src, vnet, vm), f"{vnet} to map", timeout=5)
    finally:
        src.stop()
        if hv.pid("libvirtd") is None:
            hv.start_libvirtd()
        if vm is not None:
            vm.undefine()


def test_qemu_hook_start_phase_sees_the_final_tap(
        hv: Libvirtd, g: guest.Guest, watched: tuple[LibvirtSource, Changes]) -> None:
    """At the qemu hook's `start` phase (before QEMU runs, so before any guest
    packet) the tap exists under its final name, and the XML on the hook's
    stdin names the VM exactly as the source later does; at `prepare` there
    is no tap yet. The hook, not the events, is where a VM can be known
    before it can send."""
    src, changes = watched
    hooks = hv.dir / "etc" / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "qemu").write_text(HOOK)
    (hooks / "qemu").chmod(0o755)
    log = hv.dir / "log"
    vm = define(hv, g, "ls7", domxml.metadata_xml("acme", "trusted"))
    try:
        reconnected(hv, src, changes)  # libvirtd reads its hooks at start
        vm.start()
        [vnet] = vm.vnets()
        until(maps_to(src, vnet, vm), f"{vnet} to map")
        phases = {line.split()[1]: line.split()[2:] for line in
                  (log / "hook.log").read_text().splitlines() if line.split()[0] == vm.name}
        assert list(phases)[:3] == ["prepare", "start", "started"]
        assert vnet not in phases["prepare"]
        assert vnet in phases["start"]
        assert domxml.interfaces((log / "hook-prepare.xml").read_text()) == {}
        assert domxml.interfaces((log / "hook-start.xml").read_text()) == {
            vnet: src.lookup(vnet)}
    finally:
        (hooks / "qemu").unlink()
        vm.undefine()
        hv.restart_libvirtd()
