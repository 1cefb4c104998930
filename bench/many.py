"""Many VM-like interfaces in a network namespace, quickly: what a hypervisor
with hundreds of guests looks like to the agent's discovery and attach.

    add_ifaces("sgb1234-hv", 1000)     vnet0..vnet999, UP (about 1 s)

kind="tap" (default): persistent taps, which is what libvirt's vnetN are;
with no VM process holding them they have no carrier (NO-CARRIER, admin UP).
kind="veth": veth pairs with carrier, the peer p<name> in the same namespace
(it matches none of the default patterns); about 3 s per 1,000. This kernel
has no dummy links (CONFIG_DUMMY is off). Either kind carries no traffic and
goes away with the namespace; the agent discovers, attaches to and renders
policy for them as for real VMs.
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Literal

from smtpguard.daemon.netns import run_in

IFNAMSIZ = 15  # usable characters of a Linux interface name
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def _tap(name: str) -> None:
    """A persistent tap named `name` in the calling thread's namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def add_ifaces(netns: str, n: int, prefix: str = "vnet", start: int = 0,
               kind: Literal["tap", "veth"] = "tap") -> list[str]:
    """Create n UP interfaces <prefix><start>.. in netns; their names, in order."""
    names = [f"{prefix}{i}" for i in range(start, start + n)]
    longest = max(names, key=len, default="")
    if len(longest) + (kind == "veth") > IFNAMSIZ:
        raise ValueError(f"interface name {longest!r} is too long for {kind}")

    def create() -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for name in names:
                if kind == "veth":
                    ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"p{name}"},
                             state="up")
                    ipr.link("set", ifname=f"p{name}", state="up")
                else:
                    _tap(name)
                    ipr.link("set", ifname=name, state="up")

    run_in(netns, create)
    return names


if __name__ == "__main__":
    import sys
    import time
    import uuid

    from pyroute2 import IPRoute
    from pyroute2 import netns as nsmod

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    kinds: tuple[Literal["tap", "veth"], ...] = ("tap", "veth")
    for k in kinds:
        ns = f"sgmany{uuid.uuid4().hex[:5]}"
        nsmod.create(ns)
        try:
            t0 = time.monotonic()
            made = set(add_ifaces(ns, count, kind=k))

            def up(made: set[str] = made) -> int:
                with IPRoute() as ipr:
                    return sum(1 for m in ipr.get_links() if m["flags"] & 1
                               and m.get_attr("IFLA_IFNAME") in made)

            took = time.monotonic() - t0
            print(f"{k}: {count} interfaces in {took:.2f} s, {run_in(ns, up)} UP")
        finally:
            nsmod.remove(ns)
