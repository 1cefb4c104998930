"""Build and tear down the lab with pyroute2: namespaces, veth pairs, a bridge.

    <prefix>-hv     the "hypervisor": bridge br0, one veth-vmN per VM
                    (ifalias vmN), sink0 to the sink; the agent runs here
    <prefix>-vmN    a VM: eth0 with 198.18.0.(10+N) and fdac:25::(10+N)
    <prefix>-rvmN   a VM on a routed tap (veth-rvmN, 198.18.1.N)
    <prefix>-svmN   a VM on a switch that takes its frames in the host
                    device's rx_handler, as Open vSwitch does: veth-svmN is the
                    lower of a macvlan that lives in the sink, so no bridge or
                    IP hook of the hypervisor sees them (198.18.2.2N+1/31,
                    fdac:28::2N+1/127; the sink is .2N)
    <prefix>-sink   speaks SMTP on 25/465/587 for every address in
                    198.19.0.0/16 and fdac:26::/64 (local routes), so a VM
                    can fan out to many destinations

Everything is named from the prefix, and only benchmark (198.18.0.0/15) and
ULA addresses are used: no packet leaves the namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from smtpguard import logs
from smtpguard.daemon.netns import run_in
from smtpguard.errors import LabError

LAN4 = ipaddress.ip_network("198.18.0.0/24")
LAN6 = ipaddress.ip_network("fdac:25::/64")
ROUTED4 = ipaddress.ip_network("198.18.1.0/24")
ROUTED6 = ipaddress.ip_network("fdac:27::/64")
GW4, GW6 = "169.254.0.1", "fe80::1"  # what a routed VM's tap answers as
SWITCHED4 = ipaddress.ip_network("198.18.2.0/24")
SWITCHED6 = ipaddress.ip_network("fdac:28::/64")
HV_HOST = 1
DEST4 = ipaddress.ip_network("198.19.0.0/16")
DEST6 = ipaddress.ip_network("fdac:26::/64")
SINK_HOST = 2
VM_HOST_BASE = 10
MAX_VMS = 240
SINK_PORTS = (25, 465, 587)
KNOCK_PORT = 9  # discard: never served by the sink, never SMTP
STATE_ROOT = Path("/run/smtpguard-lab")
IFA_F_NODAD = 0x02
# Sinks started by this process, reaped by down() (a lab built by another
# process is found through its pid file).
_SINKS: dict[str, subprocess.Popen[bytes]] = {}


def dest_addr(i: int, family: int = 4) -> str:
    """The i-th destination address (i >= 0) the sink answers for."""
    net = DEST4 if family == 4 else DEST6
    return str(net.network_address + 1 + i)


def _host(net: ipaddress.IPv4Network | ipaddress.IPv6Network, n: int) -> str:
    return str(net.network_address + n)


@dataclass(frozen=True)
class Lab:
    prefix: str = "sglab"

    @property
    def hv(self) -> str:
        return f"{self.prefix}-hv"

    @property
    def sink(self) -> str:
        return f"{self.prefix}-sink"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.prefix

    def vm_ns(self, vm: str) -> str:
        return f"{self.prefix}-{vm}"

    def vm_addr(self, n: int, family: int = 4) -> str:
        return _host(LAN4 if family == 4 else LAN6, VM_HOST_BASE + n)

    def routed_addr(self, n: int, family: int = 4) -> str:
        return _host(ROUTED4 if family == 4 else ROUTED6, n)

    def switched_addr(self, n: int, family: int = 4, sink: bool = False) -> str:
        return _host(SWITCHED4 if family == 4 else SWITCHED6, 2 * n + (0 if sink else 1))

    def sink_addr(self, family: int = 4) -> str:
        return _host(LAN4 if family == 4 else LAN6, SINK_HOST)

    def namespaces(self) -> list[str]:
        from pyroute2 import netns

        return sorted(n for n in netns.listnetns() if n.startswith(f"{self.prefix}-"))

    def vms(self, kind: str = "vm") -> list[str]:
        """Bridged VMs (vm1, vm2, ...) or, with kind="rvm", routed ones,
        kind="svm" switched ones."""
        head = f"{self.prefix}-{kind}"
        names = [n[len(self.prefix) + 1:] for n in self.namespaces() if n.startswith(head)]
        return sorted((v for v in names if v[len(kind):].isdigit()),
                      key=lambda v: int(v[len(kind):]))

    def exists(self) -> bool:
        return self.hv in self.namespaces()


def _sysctl(ns: str, settings: dict[str, str]) -> None:
    def write() -> None:
        for key, value in settings.items():
            Path("/proc/sys", *key.split(".")).write_text(value)

    run_in(ns, write)


def up(lab: Lab, vms: int = 3, routed: int = 0, switched: int = 0) -> None:
    """Build the lab (adding VMs to an existing one up to `vms`)."""
    if not 0 <= vms <= MAX_VMS:
        raise LabError(f"--vms must be between 0 and {MAX_VMS}")
    if not 0 <= routed <= MAX_VMS:
        raise LabError(f"--routed must be between 0 and {MAX_VMS}")
    created = not lab.exists()
    try:
        _up(lab, vms, routed)
        for n in range(len(lab.vms("svm")) + 1, switched + 1):
            add_switched_vm(lab, n)
    except Exception as exc:
        if created:
            down(lab)
        raise LabError(f"building lab {lab.prefix}: {exc}") from exc


def _up(lab: Lab, vms: int, routed: int) -> None:
    from pyroute2 import IPRoute, netns

    log = logs.get(lab=lab.prefix)
    if not lab.exists():
        netns.create(lab.hv)
        netns.create(lab.sink)
        # The hypervisor routes for routed VMs; bridged ones talk to the sink directly.
        _sysctl(lab.hv, {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                         "net.ipv6.conf.default.accept_dad": "0"})
        with IPRoute(netns=lab.hv) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            br = ipr.link_lookup(ifname="br0")[0]
            ipr.link("add", ifname="sink0", kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": lab.sink})
            ipr.link("set", index=ipr.link_lookup(ifname="sink0")[0], master=br, state="up")
            ipr.link("set", index=br, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.addr("add", index=br, address=_host(LAN4, HV_HOST), prefixlen=LAN4.prefixlen)
            ipr.addr("add", index=br, address=_host(LAN6, HV_HOST), prefixlen=LAN6.prefixlen,
                     flags=IFA_F_NODAD)
            ipr.route("add", dst=str(DEST4), gateway=lab.sink_addr(4))
            ipr.route("add", dst=str(DEST6), gateway=lab.sink_addr(6))
        _sysctl(lab.sink, {"net.core.somaxconn": "8192",
                           "net.ipv4.tcp_max_syn_backlog": "8192"})
        with IPRoute(netns=lab.sink) as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.addr("add", index=eth, address=lab.sink_addr(4), prefixlen=LAN4.prefixlen)
            ipr.addr("add", index=eth, address=lab.sink_addr(6), prefixlen=LAN6.prefixlen,
                     flags=IFA_F_NODAD)
            ipr.link("set", index=eth, state="up")
            # AnyIP: the sink owns every destination address.
            for dst in (DEST4, DEST6):
                ipr.route("add", dst=str(dst), type="local", oif=lo, table=255, scope=254)
            ipr.route("add", dst=str(ROUTED4), gateway=_host(LAN4, HV_HOST))
            ipr.route("add", dst=str(ROUTED6), gateway=_host(LAN6, HV_HOST))
        _start_sink(lab)
        log.info("lab.up", namespaces=[lab.hv, lab.sink])
    for n in range(len(lab.vms()) + 1, vms + 1):
        add_vm(lab, n)
    for n in range(len(lab.vms("rvm")) + 1, routed + 1):
        add_routed_vm(lab, n)


def add_vm(lab: Lab, n: int) -> str:
    """One more VM namespace, plugged into the bridge; returns its name."""
    from pyroute2 import IPRoute, netns

    vm = f"vm{n}"
    ns = lab.vm_ns(vm)
    netns.create(ns)
    _sysctl(ns, {"net.ipv4.ip_local_port_range": "10000 65000",
                 "net.ipv4.tcp_tw_reuse": "1"})
    with IPRoute(netns=ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    with IPRoute(netns=lab.hv) as ipr:
        host = f"veth-{vm}"
        ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
        idx = ipr.link_lookup(ifname=host)[0]
        ipr.link("set", index=idx, ifalias=vm)
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
    _vm_side(lab, n)
    warm(lab, vm)
    logs.get(lab=lab.prefix).info("lab.vm_added", vm=vm, interface=f"veth-{vm}")
    return vm


def _vm_side(lab: Lab, n: int) -> None:
    """A bridged VM's eth0: its addresses, up, routes to the sink's ranges."""
    from pyroute2 import IPRoute

    with IPRoute(netns=lab.vm_ns(f"vm{n}")) as ipr:
        eth = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth, address=lab.vm_addr(n, 4), prefixlen=LAN4.prefixlen)
        ipr.addr("add", index=eth, address=lab.vm_addr(n, 6), prefixlen=LAN6.prefixlen,
                 flags=IFA_F_NODAD)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst=str(DEST4), gateway=lab.sink_addr(4))
        ipr.route("add", dst=str(DEST6), gateway=lab.sink_addr(6))


def replug_vm(lab: Lab, vm: str, host: str, ifalias: str | None = None) -> None:
    """A bridged VM restarted the way a hypervisor does it: its host
    interface goes, a new one (another name, or a name freed by another VM)
    comes, with the given ifalias; the VM keeps its addresses."""
    from pyroute2 import IPRoute

    n = int(vm.removeprefix("vm"))
    ns = lab.vm_ns(vm)
    with IPRoute(netns=ns) as ipr:
        for idx in ipr.link_lookup(ifname="eth0"):
            ipr.link("del", index=idx)  # its host side goes with it
    with IPRoute(netns=lab.hv) as ipr:
        ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
        idx = ipr.link_lookup(ifname=host)[0]
        if ifalias:  # set afterwards, as hypervisor tooling does
            ipr.link("set", index=idx, ifalias=ifalias)
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
    _vm_side(lab, n)
    warm(lab, vm)
    logs.get(lab=lab.prefix).info("lab.vm_replugged", vm=vm, interface=host, ifalias=ifalias)


def add_routed_vm(lab: Lab, n: int) -> str:
    """A VM on a routed tap (no bridge): /32 and /128 addresses, the host's
    side of the veth is its gateway, the hypervisor routes it."""
    from pyroute2 import IPRoute, netns

    vm = f"rvm{n}"
    ns = lab.vm_ns(vm)
    netns.create(ns)
    host = f"veth-{vm}"
    with IPRoute(netns=lab.hv) as ipr:
        ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
        idx = ipr.link_lookup(ifname=host)[0]
        ipr.link("set", index=idx, ifalias=vm, state="up")
        ipr.addr("add", index=idx, address=GW4, prefixlen=32)
        ipr.addr("add", index=idx, address=GW6, prefixlen=64, flags=IFA_F_NODAD)
        ipr.route("add", dst=f"{lab.routed_addr(n, 4)}/32", oif=idx)
        ipr.route("add", dst=f"{lab.routed_addr(n, 6)}/128", oif=idx)
    with IPRoute(netns=ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        eth = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth, address=lab.routed_addr(n, 4), prefixlen=32)
        ipr.addr("add", index=eth, address=lab.routed_addr(n, 6), prefixlen=128,
                 flags=IFA_F_NODAD)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst=f"{GW4}/32", oif=eth, scope=253)
        ipr.route("add", dst="0.0.0.0/0", gateway=GW4, oif=eth)
        ipr.route("add", dst="::/0", gateway=GW6, oif=eth)
    warm(lab, vm)
    logs.get(lab=lab.prefix).info("lab.vm_added", vm=vm, interface=host, routed=True)
    return vm


def add_switched_vm(lab: Lab, n: int) -> str:
    """A VM whose host device (veth-svmN) is switched in its rx_handler, the
    way an Open vSwitch port is (these machines' kernel has no openvswitch
    module): the device is the lower of a macvlan in the sink's namespace, so
    its frames pass the device's own ingress hooks (tc, netdev) and then go
    straight to the sink; the answers leave through the device's egress."""
    from pyroute2 import IPRoute, netns

    vm, host = f"svm{n}", f"veth-svm{n}"
    ns = lab.vm_ns(vm)
    netns.create(ns)
    with IPRoute(netns=lab.hv) as ipr:
        ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
        idx = ipr.link_lookup(ifname=host)[0]
        ipr.link("set", index=idx, ifalias=vm, state="up")
        ipr.link("add", ifname=f"m{vm}", kind="macvlan", link=idx, macvlan_mode="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname=f"m{vm}")[0], net_ns_fd=lab.sink)
    for side, peer, dev in ((lab.sink, False, f"m{vm}"), (ns, True, "eth0")):
        with IPRoute(netns=side) as ipr:
            idx = ipr.link_lookup(ifname=dev)[0]
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.addr("add", index=idx, address=lab.switched_addr(n, 4, not peer), prefixlen=31)
            ipr.addr("add", index=idx, address=lab.switched_addr(n, 6, not peer),
                     prefixlen=127, flags=IFA_F_NODAD)
            ipr.link("set", index=idx, state="up")
            if peer:
                ipr.route("add", dst=str(DEST4), gateway=lab.switched_addr(n, 4, True))
                ipr.route("add", dst=str(DEST6), gateway=lab.switched_addr(n, 6, True))
    warm(lab, vm)
    logs.get(lab=lab.prefix).info("lab.vm_added", vm=vm, interface=host, switched=True)
    return vm


def warm(lab: Lab, vm: str) -> None:
    """Resolve every neighbour between a VM and the sink, both families: one
    connection each to a port nobody serves (not SMTP: neither counted nor
    judged), refused. A VM's first burst would otherwise meet unresolved
    neighbours, whose queues hold a few packets (IPv6's fewest): the SYNs
    beyond are lost and their retransmissions, a second later, counted as
    such. A replugged VM's new MAC reaches the sink the same way."""
    import socket

    def knock() -> list[str]:
        failed = []
        for fam, dest in ((socket.AF_INET, dest_addr(0, 4)), (socket.AF_INET6, dest_addr(0, 6))):
            for _ in range(3):
                with socket.socket(fam, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    try:
                        s.connect((dest, KNOCK_PORT))
                    except ConnectionRefusedError:
                        break  # the answer came back: resolved both ways
                    except OSError:
                        continue
                    break
            else:
                failed.append(dest)
        return failed

    failed = run_in(lab.vm_ns(vm), knock)
    if failed:
        logs.get(lab=lab.prefix).warning("lab.warm_failed", vm=vm, unreachable=failed)


def remove_vm(lab: Lab, vm: str) -> None:
    """Delete a VM's namespace; its veth pair goes with it."""
    from pyroute2 import netns

    netns.remove(lab.vm_ns(vm))


def _start_sink(lab: Lab) -> None:
    lab.state_dir.mkdir(parents=True, exist_ok=True)
    ready = lab.state_dir / "sink.ready"
    ready.unlink(missing_ok=True)
    out = open(lab.state_dir / "sink.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "smtpguard.lab.sink", "--netns", lab.sink,
         "--ready", str(ready), "--ports", ",".join(map(str, SINK_PORTS))],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    out.close()
    _SINKS[lab.prefix] = proc
    (lab.state_dir / "sink.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the SMTP sink did not start; see {lab.state_dir / 'sink.log'}")
        time.sleep(0.05)


def down(lab: Lab) -> list[str]:
    """Stop the sink and delete every namespace of the lab."""
    from pyroute2 import netns

    pidfile = lab.state_dir / "sink.pid"
    proc = _SINKS.pop(lab.prefix, None)
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pidfile.read_text())
        os.killpg(pid, signal.SIGTERM)
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
    removed = []
    for ns in reversed(lab.namespaces()):
        with contextlib.suppress(OSError):
            netns.remove(ns)
            removed.append(ns)
    shutil.rmtree(lab.state_dir, ignore_errors=True)
    if removed:
        logs.get(lab=lab.prefix).info("lab.down", namespaces=removed)
    return removed
