"""Which interfaces face VMs, which VM each belongs to, and netlink events."""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from smtpguard.datapath import linkdump
from smtpguard.policy.model import InterfacePattern

_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,62}$")


@dataclass(frozen=True)
class VmIface:
    """A VM-facing interface and the VM it belongs to."""

    ifindex: int
    ifname: str
    vm: str
    pattern: str
    tenant: str | None = None


@dataclass(frozen=True)
class LinkEvent:
    kind: str  # "new" or "del"
    ifindex: int
    ifname: str
    ifalias: str | None


def classify(
    ifindex: int, ifname: str, ifalias: str | None,
    patterns: Sequence[InterfacePattern], vm_from_ifalias: bool = True,
) -> VmIface | None:
    """The first pattern that matches wins. The VM is named by the interface's
    ifalias when set (and allowed), else by the pattern's {vm} part, else by
    the interface name."""
    for p in patterns:
        m = p.regex().match(ifname)
        if not m:
            continue
        vm = ifname
        if "vm" in m.groupdict() and m.group("vm"):
            vm = m.group("vm")
        alias = parse_ifalias(ifalias) if vm_from_ifalias else {}
        return VmIface(ifindex, ifname, alias.get("vm", vm), p.pattern, alias.get("tenant"))
    return None


def parse_ifalias(ifalias: str | None) -> dict[str, str]:
    """'web1' -> {vm: web1}; 'vm=web1 tenant=acme' -> both; anything else -> {}."""
    text = (ifalias or "").strip()
    if not text:
        return {}
    if "=" not in text:
        return {"vm": text} if _VM_NAME.match(text) else {}
    out = {}
    for part in text.split():
        key, _, value = part.partition("=")
        if key in ("vm", "tenant") and _VM_NAME.match(value):
            out[key] = value
    return out


def link_event(msg: Any) -> LinkEvent | None:
    event = msg.get("event")
    # Bridges also send RTM_NEWLINK/RTM_DELLINK with family AF_BRIDGE about
    # port state; those carry no ifalias and a DELLINK there only means the
    # port left the bridge.
    if event not in ("RTM_NEWLINK", "RTM_DELLINK") or msg.get("family", 0) != 0:
        return None
    return LinkEvent(
        "new" if event == "RTM_NEWLINK" else "del",
        int(msg["index"]),
        str(msg.get_attr("IFLA_IFNAME")),
        msg.get_attr("IFLA_IFALIAS"),
    )


def dump_links() -> list[LinkEvent]:
    """Every link now (in this thread's namespace), as 'new' events."""
    return [LinkEvent("new", index, name, alias) for index, name, alias in linkdump.links()]


class LinkMonitor:
    """Netlink link events on a queue, read by a thread of its own (pyroute2's
    sockets belong to the thread that made them)."""

    def __init__(self) -> None:
        # None: a wake-up for the agent's loop from another thread
        self.events: queue.Queue[LinkEvent | None] = queue.Queue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="link-monitor", daemon=True)

    def start(self) -> None:
        """Returns once subscribed, so a dump taken afterwards misses nothing."""
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        try:
            mon = IPRoute()
            mon.bind(groups=RTMGRP_LINK)
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            for msg in mon.get():
                ev = link_event(msg)
                if ev is not None:
                    self.events.put(ev)
