"""A real agent against the kit's libvirtd, and what the tests watch it by.

    agent = start_agent(hv, tmp, policy_text(hv))   # `smtpguard run` in hv.netns
    with Watch(hv.netns) as w:                      # taps and SYNs, timestamped
        ...
        w.first_syn("vnet3", after=t0)

The agent is the integration tier's AgentProc (tests/integration/conftest.py)
run in the kit's hypervisor namespace, where libvirtd makes its taps; its
policy names the kit's libvirtd (`inventory.libvirt.uri`). install_hook()
puts libvirt's qemu hook (libvirt/qemu-hook, pointed at the test agent's
control socket) into the kit's private /etc/libvirt/hooks/qemu.d.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libvirtd import Libvirtd

from integration.conftest import AgentProc
from smtpguard.daemon.netns import enter
from smtpguard.datapath import linkdump
from smtpguard.lab import topology

ROOT = Path(__file__).resolve().parents[2]
VENV_SMTPGUARD = ROOT / ".venv" / "bin" / "smtpguard"

HOOK = """#!/bin/sh
# Written by tests/hypervisor/agentkit.py: libvirt/qemu-hook for the test agent
# (its control socket), with the hook's own output and timings logged.
echo "$(date +%s.%N) $1 $2 begin" >> {log}
{smtpguard} libvirt-hook --socket {socket} "$@" 2>> {log}
rc=$?
echo "$(date +%s.%N) $1 $2 end $rc" >> {log}
exit $rc
"""


def policy_text(hv: Libvirtd, classes: str = "") -> str:
    """A policy naming VMs from the kit's libvirtd, with a default class whose
    ceiling no test reaches and no thresholds (only operators act)."""
    return f"""version: 1
inventory:
  libvirt: {{enabled: true, uri: "{hv.uri}"}}
  proxmox: {{enabled: false}}
classes:
  default:
    port25: block
    limit: {{rate: 6000/minute, burst: 1000}}
    thresholds: []
{classes}"""


def default_policy_text(hv: Libvirtd) -> str:
    """The built-in default policy (its classes, ceilings, thresholds and
    interface patterns), only naming VMs from the kit's libvirtd."""
    return f"""version: 1
inventory:
  libvirt: {{enabled: true, uri: "{hv.uri}"}}
  proxmox: {{enabled: false}}
"""


def start_agent(hv: Libvirtd, tmp: Path, policy: str) -> AgentProc:
    """`smtpguard run` (enforcing, the policy's backend) in the kit's
    hypervisor namespace, connected to its libvirtd."""
    path = tmp / "policy.yaml"
    path.write_text(policy)
    agent = AgentProc(hv.net.lab, tmp, path, enforce=True)
    try:
        agent.start()
        agent.wait_event("inventory.libvirt_connected", timeout=30)
    except BaseException:
        stop_agent(agent)
        raise
    return agent


def stop_agent(agent: AgentProc) -> None:
    try:
        agent.stop()
    finally:
        agent.cleanup()


def install_hook(hv: Libvirtd, agent: AgentProc) -> Path:
    """The qemu hook in the kit's /etc/libvirt/hooks/qemu.d (read by libvirtd
    at its start: restart it). Returns the hook's log."""
    log = hv.dir / "hook.log"
    hooks = hv.dir / "etc" / "hooks" / "qemu.d"
    hooks.mkdir(parents=True, exist_ok=True)
    script = hooks / "smtpguard"
    script.write_text(HOOK.format(log=log, smtpguard=VENV_SMTPGUARD, socket=agent.socket))
    script.chmod(0o755)
    return log


def remove_hook(hv: Libvirtd) -> None:
    with contextlib.suppress(FileNotFoundError):
        (hv.dir / "etc" / "hooks" / "qemu.d" / "smtpguard").unlink()


def sink_leg(hv: Libvirtd, bridge: str, addr: str) -> str:
    """A second sink interface, on `bridge` (the sink namespace's eth1 at
    addr, e.g. "198.18.2.2/24"), so a guest's second NIC reaches the sink on
    its own link. It goes with the kit's namespaces."""
    from pyroute2 import IPRoute

    lab: topology.Lab = hv.net.lab
    ip, plen = addr.split("/")
    with IPRoute(netns=lab.hv) as ipr:
        ipr.link("add", ifname="sink1", kind="veth",
                 peer={"ifname": "eth1", "net_ns_fd": lab.sink})
        [br] = ipr.link_lookup(ifname=bridge)
        ipr.link("set", index=ipr.link_lookup(ifname="sink1")[0], master=br, state="up")
    with IPRoute(netns=lab.sink) as ipr:
        [eth] = ipr.link_lookup(ifname="eth1")
        ipr.addr("add", index=eth, address=ip, prefixlen=int(plen))
        ipr.link("set", index=eth, state="up")
    return ip


# -- reading the agent --------------------------------------------------------

def rows(agent: AgentProc) -> dict[str, dict[str, Any]]:
    """`smtpguard status --json`, by VM id."""
    return {r["vm"]: r for r in agent.ctl("status", "--json")}  # type: ignore[union-attr]


def wait_row(agent: AgentProc, vm: str, check: Callable[[dict[str, Any]], bool],
             what: str, timeout: float = 15) -> dict[str, Any]:
    """VM's status row once check(row) holds."""
    deadline = time.monotonic() + timeout
    while True:
        got = rows(agent)
        r = got.get(vm)
        if r is not None and check(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"{vm}: no status row with {what} in {timeout:g}s: {got}")
        time.sleep(0.1)


def hook_phases(log: Path, domain: str, op: str) -> list[tuple[float, float]]:
    """(begin, end) wall times of each run of the hook for domain and op."""
    out: list[tuple[float, float]] = []
    begun: float | None = None
    for line in log.read_text().splitlines():
        words = line.split()
        if len(words) >= 4 and words[1:3] == [domain, op]:
            if words[3] == "begin":
                begun = float(words[0])
            elif words[3] == "end" and begun is not None:
                out.append((begun, float(words[0])))
                begun = None
    return out


def process_started(pid: int | None) -> float:
    """When a process was forked, as seconds since the epoch (10 ms steps)."""
    assert pid is not None, "no pid"
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return booted + ticks / os.sysconf("SC_CLK_TCK")


def ts(ev: dict[str, Any]) -> float:
    """A log event's timestamp (ISO, UTC) as seconds since the epoch."""
    return datetime.datetime.fromisoformat(ev["timestamp"]).timestamp()


def events_since(agent: AgentProc, name: str, since: float, **fields: Any
                 ) -> list[dict[str, Any]]:
    return [ev for ev in agent.events(name) if ts(ev) >= since
            and all(ev.get(k) == v for k, v in fields.items())]


def wait_events(agent: AgentProc, name: str, since: float, timeout: float = 10,
                **fields: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (found := events_since(agent, name, since, **fields)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {name} {fields} since {since} in {timeout:g}s:\n"
                                 f"{agent.log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    return found


# -- watching the wire ---------------------------------------------------------

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # asm-generic/socket.h (x86 too)
RTMGRP_LINK = 1
TCP_SYN, TCP_ACK = 0x02, 0x10


class Watch:
    """In a network namespace, on a thread of its own: when each vnet* link
    appeared (netlink RTM_NEWLINK, wall clock at receipt) and every TCP SYN a
    guest sent into a vnet* tap (AF_PACKET, the kernel's receive timestamp:
    packet sockets see a frame before tc and netfilter do, so a SYN that the
    agent rejects is seen too)."""

    def __init__(self, netns: str, prefix: str = "vnet") -> None:
        self.netns = netns
        self.prefix = prefix
        self.links: list[tuple[float, int, str]] = []  # (time, ifindex, ifname), new links
        # (time, ifname, source address, source port, destination port)
        self.syns: list[tuple[float, str, str, int, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{netns}", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def first_link(self, ifname: str, after: float) -> float | None:
        with self._lock:
            return min((t for t, _i, n in self.links if n == ifname and t >= after),
                       default=None)

    def first_syn(self, ifname: str, after: float, port: int | None = None) -> float | None:
        with self._lock:
            return min((t for t, n, _s, _sp, p in self.syns if n == ifname and t >= after
                        and (port is None or p == port)), default=None)

    def attempts(self, ifnames: list[str], after: float) -> list[float]:
        """When each distinct attempt (source address and port) on these taps
        sent its first SYN, in order: retransmissions are not attempts."""
        first: dict[tuple[str, int], float] = {}
        with self._lock:
            for t, n, src, sport, _p in self.syns:
                if n in ifnames and t >= after:
                    first[(src, sport)] = min(t, first.get((src, sport), t))
        return sorted(first.values())

    def _run(self) -> None:
        try:
            enter(self.netns)
            nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, linkdump.NETLINK_ROUTE)
            nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            nl.bind((0, RTMGRP_LINK))
            pk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            pk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            pk.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        names: dict[int, str] = {}
        with nl, pk:
            while not self._stop.is_set():
                readable, _, _ = select.select([nl, pk], [], [], 0.2)
                if nl in readable:
                    self._netlink(nl.recv(1 << 16), names)
                if pk in readable:
                    self._packet(pk)

    def _netlink(self, data: bytes, names: dict[int, str]) -> None:
        now = time.time()
        view = memoryview(data)
        off = 0
        while off + linkdump.NLMSG_HDR.size <= len(view):
            length, kind, _, _, _ = linkdump.NLMSG_HDR.unpack_from(view, off)
            if length < linkdump.NLMSG_HDR.size:
                return
            if kind == linkdump.RTM_NEWLINK:
                index, name, _alias = linkdump._link(
                    view[off + linkdump.NLMSG_HDR.size:off + length])
                if name.startswith(self.prefix) and names.get(index) != name:
                    names[index] = name
                    with self._lock:
                        self.links.append((now, index, name))
            off += (length + 3) & ~3

    def _packet(self, pk: socket.socket) -> None:
        data, anc, _flags, addr = pk.recvmsg(256, socket.CMSG_SPACE(16))
        ifname, _proto, pkttype = addr[0], addr[1], addr[2]
        if pkttype == PACKET_OUTGOING or not ifname.startswith(self.prefix):
            return
        t = time.time()
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                sec, nsec = struct.unpack("qq", value[:16])
                t = sec + nsec / 1e9
        found = _tcp_syn(data)
        if found is not None:
            with self._lock:
                self.syns.append((t, ifname, *found))


def _tcp_syn(frame: bytes) -> tuple[str, int, int] | None:
    """(source address, source port, destination port) of an Ethernet frame
    carrying a TCP SYN (without ACK), else None."""
    if len(frame) < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800 and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        if frame[23] != 6:
            return None
        tcp, src = 14 + ihl, socket.inet_ntop(socket.AF_INET, frame[26:30])
    elif ethertype == 0x86DD and len(frame) >= 54:
        if frame[20] != 6:  # no extension headers from these guests
            return None
        tcp, src = 54, socket.inet_ntop(socket.AF_INET6, frame[22:38])
    else:
        return None
    if len(frame) < tcp + 14:
        return None
    flags = frame[tcp + 13]
    if flags & TCP_SYN and not flags & TCP_ACK:
        sport, dport = struct.unpack_from("!HH", frame, tcp)
        return src, sport, dport
    return None
