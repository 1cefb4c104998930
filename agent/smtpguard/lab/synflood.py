"""Raw SYN frames from a lab VM: the load generator of the reliability tests
and the benchmarks.

Frames leave the VM's eth0 through an AF_PACKET socket, addressed as the
VM's kernel would address them (a routed VM to its gateway, the host side of
its tap; a bridged one to the sink), so the hypervisor sees them as the VM's
own: the classifier on its interface, the firewall, the route to the sink.
The VM's TCP stack never knows. Every frame is a new attempt with its own
initial sequence number. The TCP checksum is left zero (tc and nftables do
not check it; the IP layer checks the IPv4 header's, which is set).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology

SYN = 0x02
SPORTS = 50_000  # source ports cycle over 10000..59999, as a busy client's do
DESTS = 200
ETH_P_IP = b"\x08\x00"


@dataclass(frozen=True)
class Endpoint:
    """Where a VM's frames come from and the next hop's MAC."""

    src: bytes  # IPv4 address, packed
    src_mac: bytes
    dst_mac: bytes


@dataclass(frozen=True)
class Batch:
    began: float  # time.monotonic() just before its first frame left
    ended: float  # ... and just after its last
    frames: int


@dataclass(frozen=True)
class Paced:
    sent: int
    batches: tuple[Batch, ...]  # as they left, in order

    @property
    def seconds(self) -> float:
        """From just before the first frame to just after the last."""
        return self.batches[-1].ended - self.batches[0].began


def mac(ns: str, ifname: str) -> bytes:
    def run() -> bytes:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
            return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))

    return run_in(ns, run)


def with_checksum(ip: bytes) -> bytes:
    """The IPv4 header checksum, which the IP layer checks (tc does not)."""
    hdr = bytearray(ip[:20])
    struct.pack_into("!H", hdr, 10, 0)
    total = sum(struct.unpack("!10H", bytes(hdr)))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", hdr, 10, ~total & 0xFFFF)
    return bytes(hdr) + ip[20:]


def endpoint(lab: topology.Lab, vm: str) -> Endpoint:
    """A routed VM (rvmN) sends to the host side of its tap, a bridged one
    (vmN) to the sink, the gateway of its route to the destinations."""
    n = int(vm.lstrip("rvm"))
    if vm.startswith("rvm"):
        src, dst_mac = lab.routed_addr(n), mac(lab.hv, f"veth-{vm}")
    else:
        src, dst_mac = lab.vm_addr(n), mac(lab.sink, "eth0")
    return Endpoint(ipaddress.IPv4Address(src).packed, mac(lab.vm_ns(vm), "eth0"), dst_mac)


def syn(ep: Endpoint, dst: int, sport: int, dport: int, seq: int) -> bytes:
    """One SYN frame to the dst-th destination the sink answers for."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, socket.IPPROTO_TCP, 0, ep.src,
                     ipaddress.IPv4Address(topology.dest_addr(dst)).packed)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, 0, 5 << 4, SYN,
                      65535, 0, 0)
    return ep.dst_mac + ep.src_mac + ETH_P_IP + with_checksum(ip) + tcp


def burst(ep: Endpoint, n: int, port: int, sports: int = SPORTS, dests: int = DESTS,
          first: int = 0) -> list[bytes]:
    """The i-th attempt: source port 10000 + i % sports, destination i % dests,
    ISN first + i. Ports are reused, so attempts share 5-tuples (with the
    defaults 50,000 distinct ones) and only the ISN tells them apart."""
    return [syn(ep, i % dests, 10000 + i % sports, port, i) for i in range(first, first + n)]


def send(lab: topology.Lab, vm: str, frames: list[bytes]) -> tuple[int, float]:
    """Send prepared frames from the VM's eth0 back to back: (sent, seconds)."""
    def run() -> tuple[int, float]:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("eth0", 0))
            t0 = time.monotonic()
            sent = sum(1 for fr in frames if s.send(fr))
            return sent, time.monotonic() - t0

    return run_in(lab.vm_ns(vm), run)


def flood(lab: topology.Lab, vm: str, n: int, port: int, sports: int = SPORTS,
          dests: int = DESTS) -> tuple[int, float]:
    """n SYNs with distinct (port, ISN) as fast as this machine sends them,
    so the firewall sees them as the VM's own: (sent, seconds)."""
    return send(lab, vm, burst(endpoint(lab, vm), n, port, sports, dests))


def paced(lab: topology.Lab, vm: str, port: int, rate: float, seconds: float,
          start: float | None = None, tick: float = 0.01) -> Paced:
    """round(rate x seconds) + 1 SYNs spread evenly from `start` (a
    time.monotonic(); default now) to `start + seconds`, sent every `tick`
    in batches of those due. Every attempt has a 5-tuple of its own (the
    destination moves on after each cycle of source ports)."""
    ep = endpoint(lab, vm)
    total = round(rate * seconds) + 1
    step = seconds / (total - 1) if total > 1 else 0.0

    def frame(i: int) -> bytes:
        return syn(ep, (i // SPORTS) % 65000, 10000 + i % SPORTS, port, i)

    def run() -> Paced:
        t0 = time.monotonic() if start is None else start
        _sleep_until(t0)
        sent, batches = 0, []
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("eth0", 0))
            while sent < total:
                now = time.monotonic()
                due = min(total, int((now - t0) / step) + 1) if step else total
                for i in range(sent, due):
                    s.send(frame(i))
                batches.append(Batch(now, time.monotonic(), due - sent))
                sent = due
                if sent < total:  # the next frame's time, or a tick's batch
                    _sleep_until(max(t0 + sent * step, now + tick))
        return Paced(sent, tuple(batches))

    return run_in(lab.vm_ns(vm), run)


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def link_stats(ns: str, ifname: str) -> dict[str, int]:
    """A link's counters (IFLA_STATS64). A veth counts as tx_dropped every
    frame it could not hand to its peer (e.g. that CPU's input backlog was
    full): sent minus the VM's eth0 tx_dropped is what reached the host."""
    def read() -> dict[str, int]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            st = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_STATS64")
            return {k: int(v) for k, v in st.items()}

    return run_in(ns, read)


def dropped() -> int:
    """Packets the kernel dropped from its input backlogs (all CPUs)."""
    return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat")
               .read_text().splitlines())
