"""The hypervisor kit itself, with real parts: Debian's libvirtd and QEMU (TCG),
the cloud kernel's TCP stack in the guest, the counting sink on the host side."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import guest
import pytest
from libvirtd import RUN_ROOT, Libvirtd, sweep
from pyroute2 import IPRoute, netns

from smtpguard.daemon.netns import run_in

HERE = Path(__file__).resolve().parent


def links(ns: str) -> list[str]:
    def names() -> list[str]:
        with IPRoute() as ipr:
            return sorted(str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links())

    return run_in(ns, names)


def traces(prefix: str) -> list[str]:
    """Whatever of a kit is still on this host: namespaces, processes, files."""
    left = [f"netns {n}" for n in netns.listnetns() if n.startswith(prefix)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if prefix in cmd and state != "Z":
            left.append(f"process {pid}: {cmd[:120]}")
    left += [f"file {p}" for p in (RUN_ROOT / prefix, Path("/etc/libvirt/qemu") /
                                   f"{prefix}-vm1.xml") if p.exists()]
    return left


def test_guest_kernel_completes_smtp_handshakes_with_sink(hv: Libvirtd) -> None:
    """A guest booted by libvirt under TCG completes every SMTP handshake it
    attempts, over IPv4 and IPv6, and the sink counts exactly those, from
    that guest's address: what the guest reports on its serial console is
    what happened on the wire."""
    sends = [guest.Send(hv.net.dest(0), 25, 3), guest.Send(hv.net.dest(1, 6), 587, 2)]
    vm = hv.add_vm(1, sends=sends)
    try:
        got = vm.wait_done("r1")
        assert [(r.host, r.port, r.ok, r.fail) for r in got] == [
            (hv.net.dest(0), 25, 3, 0), (hv.net.dest(1, 6), 587, 2, 0)]
        sink = hv.net.sink
        assert sink.count(port=25, peer=hv.net.guest_addr(1)) == 3
        assert sink.count("connections", port=25, peer=hv.net.guest_addr(1)) == 3
        assert sink.count(port=587, peer=hv.net.guest_addr(1, 6)) == 2
        more = vm.request([guest.Send(hv.net.dest(2), 2525, 2)])
        assert [(r.port, r.ok) for r in more] == [(2525, 2)]
        assert sink.count(port=2525, peer=hv.net.guest_addr(1)) == 2
        assert f"SGRESULT id={more[0].id} " in vm.console()
    finally:
        vm.undefine()


def test_guest_reaches_only_what_the_kit_made(hv: Libvirtd) -> None:
    """The kit's libvirtd defines no network of its own (no `default` NAT,
    no virbr0) and its namespace holds only the bridge, the sink's veth and
    the guest's tap; a SYN to an address nobody owns is dropped, and the
    guest gives up after its timeout instead of hanging."""
    vm = hv.add_vm(4, timeout=1)
    try:
        vm.wait_console("SGREADY")
        assert hv.conn().listAllNetworks() == []
        assert links(hv.netns) == sorted(["lo", "br0", "sink0", *vm.vnets()])
        got = vm.request([guest.Send("198.18.1.1", 25, 2)])
        assert [(r.ok, r.timeout) for r in got] == [(0, 2)]
        assert hv.net.sink.count("connections", peer=hv.net.guest_addr(4)) == 0
    finally:
        vm.undefine()


def test_restarted_domain_gets_another_vnet(hv: Libvirtd) -> None:
    """libvirt gives a domain started again after destroy the next free tap
    name, and the old tap is gone: a VM's interface name does not stay its
    own across restarts (what the agent must follow by VM, not by name)."""
    vm = hv.add_vm(2)
    try:
        first = vm.vnets()
        assert len(first) == 1 and first[0].startswith("vnet")
        vm.destroy()
        assert first[0] not in links(hv.netns)
        vm.start()
        second = vm.vnets()
        assert len(second) == 1 and second != first
        assert second[0] in links(hv.netns)
        vm.wait_console("SGREADY")
    finally:
        vm.undefine()


def test_libvirtd_restart_keeps_running_domain(hv: Libvirtd) -> None:
    """Restarting libvirtd under a running domain leaves the guest running:
    the same QEMU process and tap, listed and active afterwards, and the
    guest still mails the sink."""
    vm = hv.add_vm(3)
    try:
        vm.wait_console("SGREADY")
        pid, taps = vm.qemu_pid(), vm.vnets()
        old = hv.pid("libvirtd")
        hv.restart_libvirtd()
        assert hv.pid("libvirtd") not in (None, old)
        assert vm.name in hv.domains() and vm.is_active()
        assert vm.qemu_pid() == pid and vm.vnets() == taps
        assert [r.ok for r in vm.request([guest.Send(hv.net.dest(0), 25, 1)])] == [1]
    finally:
        vm.undefine()


def test_cleanup_leaves_nothing_even_when_the_test_fails(hypervisor_setup: None) -> None:
    """A kit whose test raises still removes its domains, daemons, QEMU
    processes, namespaces, bridge and files; and the host's own libvirt
    configuration never saw them."""
    with pytest.raises(RuntimeError, match="the test failed"), Libvirtd() as hv:
        prefix = hv.prefix
        vm = hv.add_vm(1)
        vm.wait_console("SGREADY")
        assert vm.qemu_pid() is not None and traces(prefix)
        raise RuntimeError("the test failed")
    assert traces(prefix) == []


def test_sweep_removes_a_killed_run(hypervisor_setup: None) -> None:
    """A test process killed outright (no cleanup ran) leaves a kit that the
    next kit's start (sweep) removes completely, running guest included."""
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from libvirtd import Libvirtd; hv = Libvirtd(); hv.open();"
            "hv.add_vm(1).wait_console('SGREADY'); print(hv.prefix, flush=True);"
            "time.sleep(600)"), str(HERE)],
        stdout=subprocess.PIPE, text=True)
    with child:
        try:
            assert child.stdout is not None
            prefix = child.stdout.readline().strip()
            assert prefix.startswith("sgh") and traces(prefix)
        finally:
            child.send_signal(signal.SIGKILL)
    sweep()  # (a concurrent run's start may have swept it first: as good)
    assert traces(prefix) == []
