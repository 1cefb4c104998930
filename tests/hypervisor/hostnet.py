"""The network a test hypervisor's guests live on, and the sink they mail to.

Laid out like the lab (smtpguard.lab.topology), with the same names and
addresses, so `Network.lab` works wherever a lab does (AgentProc, our_filters):

    <prefix>-hv     the hypervisor: bridge br0 (198.18.0.1/24, fdac:25::1/64);
                    libvirtd runs here, so its vnetN taps appear here
    <prefix>-sink   eth0 on br0 (198.18.0.2, fdac:25::2), the guests' gateway;
                    owns every address in 198.19.0.0/16 and fdac:26::/64 and
                    answers SMTP on them (Sink, which counts)

The namespaces have no other links and no routes out: a guest can reach
only addresses this module created. Guest n is 198.18.0.(10+n) (Lab.vm_addr);
the lab's own VM namespaces are not created here, so nothing else holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
from collections import Counter
from typing import Any

from aiosmtpd.smtp import SMTP

from smtpguard.daemon.netns import enter, run_in
from smtpguard.lab import topology
from smtpguard.lab.sink import BACKLOG, Discard, _listener

PORTS = (25, 465, 587, 2525)
BENCH4 = ipaddress.ip_network("198.18.0.0/15")
ULA = ipaddress.ip_network("fc00::/7")


class Sink:
    """An SMTP server (aiosmtpd, accept and discard) in a thread inside a
    network namespace, counting per (client address, port):

    connections: TCP handshakes it accepted;
    sessions: SMTP dialogues completed (banner sent, QUIT answered with 221),
    which is what the guest counts as ok."""

    def __init__(self, netns: str, ports: tuple[int, ...] = PORTS) -> None:
        self.netns = netns
        self.ports = ports
        self._counts: dict[str, Counter[tuple[str, int]]] = {
            "connections": Counter(), "sessions": Counter()}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def up(self, timeout: float = 10) -> None:
        ready = threading.Event()
        failed: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            servers = [await self._loop.create_server(lambda: _CountingSMTP(self),
                                                      sock=_listener(p), backlog=BACKLOG)
                       for p in self.ports]
            ready.set()
            await self._stop.wait()
            for s in servers:
                s.close()
                await s.wait_closed()

        def run() -> None:
            try:
                enter(self.netns)
                asyncio.run(serve())
            except BaseException as exc:  # reported by up()
                failed.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name=f"sink-{self.netns}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failed:
            raise RuntimeError(f"sink in {self.netns} did not start") from (
                failed[0] if failed else None)

    def down(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._thread = self._loop = self._stop = None

    def count(self, kind: str = "sessions", port: int | None = None,
              peer: str | None = None) -> int:
        """Connections or sessions so far, optionally for one port or client."""
        with self._lock:
            return sum(n for (p_peer, p_port), n in self._counts[kind].items()
                       if (port is None or p_port == port) and (peer is None or p_peer == peer))

    def reset(self) -> None:
        with self._lock:
            for c in self._counts.values():
                c.clear()

    def _add(self, kind: str, key: tuple[str, int]) -> None:
        with self._lock:
            self._counts[kind][key] += 1


class _Counter(Discard):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.sink._add("sessions", server.sg_key)
        return "221 Bye"


class _CountingSMTP(SMTP):
    def __init__(self, sink: Sink) -> None:
        super().__init__(_Counter(sink), hostname="sink.hv", ident="smtpguard-hv-sink")
        self.sg_sink = sink
        self.sg_key = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = ipaddress.ip_address(transport.get_extra_info("peername")[0])
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped:
            peer = peer.ipv4_mapped
        self.sg_key = (str(peer), int(transport.get_extra_info("sockname")[1]))
        self.sg_sink._add("connections", self.sg_key)


class Network:
    """The two namespaces and the sink; close() removes all of it (idempotent)."""

    def __init__(self, prefix: str, ports: tuple[int, ...] = PORTS) -> None:
        self.lab = topology.Lab(prefix)
        self.bridge = "br0"
        self.sink = Sink(self.lab.sink, ports)

    @property
    def netns(self) -> str:
        """Where libvirtd, the bridge and the taps are (and an agent would run)."""
        return self.lab.hv

    def guest_addr(self, n: int, family: int = 4) -> str:
        """Guest n's address on br0, without the prefix length."""
        return self.lab.vm_addr(n, family)

    def guest_net(self, n: int, family: int = 4) -> dict[str, str]:
        """guest.cmdline() keywords for guest n on eth0: address and gateway."""
        lan = topology.LAN4 if family == 4 else topology.LAN6
        addr = f"{self.guest_addr(n, family)}/{lan.prefixlen}"
        gw = self.lab.sink_addr(family)
        return {"ip": addr, "gw": gw} if family == 4 else {"ip6": addr, "gw6": gw}

    def dest(self, i: int = 0, family: int = 4) -> str:
        """The i-th address the sink answers on (a distinct destination each)."""
        return topology.dest_addr(i, family)

    def up(self) -> None:
        from pyroute2 import IPRoute, netns

        lab, lan4, lan6 = self.lab, topology.LAN4, topology.LAN6
        nodad = topology.IFA_F_NODAD
        netns.create(lab.hv)
        netns.create(lab.sink)
        for ns in (lab.hv, lab.sink):
            run_in(ns, _no_dad)
        with IPRoute(netns=lab.hv) as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link("add", ifname="sink0", kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": lab.sink})
            ipr.link("set", index=ipr.link_lookup(ifname="sink0")[0], master=br, state="up")
            ipr.link("set", index=br, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.addr("add", index=br, address=str(lan4.network_address + topology.HV_HOST),
                     prefixlen=lan4.prefixlen)
            ipr.addr("add", index=br, address=str(lan6.network_address + topology.HV_HOST),
                     prefixlen=lan6.prefixlen, flags=nodad)
        with IPRoute(netns=lab.sink) as ipr:
            eth = ipr.link_lookup(ifname="eth0")[0]
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.addr("add", index=eth, address=lab.sink_addr(4), prefixlen=lan4.prefixlen)
            ipr.addr("add", index=eth, address=lab.sink_addr(6), prefixlen=lan6.prefixlen,
                     flags=nodad)
            ipr.link("set", index=eth, state="up")
            for dst in (topology.DEST4, topology.DEST6):  # AnyIP, as in the lab
                ipr.route("add", dst=str(dst), type="local", oif=lo, table=255, scope=254)
        self.sink.up()

    def add_bridge(self, name: str, addr4: str | None = None,
                   addr6: str | None = None) -> str:
        """Another bridge in the hypervisor namespace (for a guest's second
        NIC), with host addresses such as "198.18.2.1/24" and "fdac:28::1/64":
        benchmark and ULA space only. It goes with the namespace."""
        from pyroute2 import IPRoute

        for addr, space in ((addr4, BENCH4), (addr6, ULA)):
            net = ipaddress.ip_interface(addr).network if addr else None
            if net is not None and (net.version != space.version or not net.subnet_of(space)):
                raise ValueError(f"{addr} is outside {space}")
        with IPRoute(netns=self.netns) as ipr:
            ipr.link("add", ifname=name, kind="bridge")
            br = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=br, state="up")
            for addr in filter(None, (addr4, addr6)):
                iface = ipaddress.ip_interface(addr)
                ipr.addr("add", index=br, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen, flags=topology.IFA_F_NODAD)
        return name

    def add_uplink(self, name: str, peer: str, addr4: str, addr6: str | None = None) -> str:
        """A veth pair from the hypervisor namespace straight into the sink's:
        `name` stays in the hypervisor, up and free, like a host's uplink NIC
        (e.g. the lower device of a guest's macvtap); `peer` is the sink's, with
        host addresses such as "198.18.4.2/24" and "fdac:29::2/64" (benchmark
        and ULA space only), its subnets the guests' on that uplink. What leaves
        `name` reaches the sink with no bridge and no host firewall between
        (on a bridge port the agent's bridge table would act on it too).
        Returns name. It goes with the namespaces, or with del_link()."""
        from pyroute2 import IPRoute

        for addr, space in ((addr4, BENCH4), (addr6, ULA)):
            net = ipaddress.ip_interface(addr).network if addr else None
            if net is not None and (net.version != space.version or not net.subnet_of(space)):
                raise ValueError(f"{addr} is outside {space}")
        with IPRoute(netns=self.netns) as ipr:
            ipr.link("add", ifname=name, kind="veth",
                     peer={"ifname": peer, "net_ns_fd": self.lab.sink})
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        with IPRoute(netns=self.lab.sink) as ipr:
            [p] = ipr.link_lookup(ifname=peer)
            for addr in filter(None, (addr4, addr6)):
                iface = ipaddress.ip_interface(addr)
                ipr.addr("add", index=p, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen, flags=topology.IFA_F_NODAD)
            ipr.link("set", index=p, state="up")
        return name

    def del_link(self, name: str) -> None:
        """Delete a link of the hypervisor namespace (a veth takes its peer
        along); gone already is fine."""
        from pyroute2 import IPRoute

        with IPRoute(netns=self.netns) as ipr:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)

    def close(self) -> None:
        self.sink.down()
        topology.down(self.lab)


def _no_dad() -> None:
    """Addresses usable at once: no duplicate-address detection delay."""
    for conf in ("all", "default"):
        with open(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad", "w") as f:
            f.write("0")
