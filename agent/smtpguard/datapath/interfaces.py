"""The host's links, now and as they change (netlink), as events for the agent;
which VM a link belongs to is inventory/resolve.py's to say."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

from smtpguard.datapath import linkdump


@dataclass(frozen=True)
class LinkEvent:
    kind: str  # "new" or "del"
    ifindex: int
    ifname: str
    ifalias: str | None
    master: int = 0  # the ifindex it is enslaved to (a bridge, ovs-system)
    link_kind: str = ""  # IFLA_INFO_KIND: "macvtap", "bridge", "openvswitch", ...


def link_event(msg: Any) -> LinkEvent | None:
    event = msg.get("event")
    # Bridges also send RTM_NEWLINK/RTM_DELLINK with family AF_BRIDGE about
    # port state; those carry no ifalias and a DELLINK there only means the
    # port left the bridge.
    if event not in ("RTM_NEWLINK", "RTM_DELLINK") or msg.get("family", 0) != 0:
        return None
    info = msg.get_attr("IFLA_LINKINFO")
    return LinkEvent(
        "new" if event == "RTM_NEWLINK" else "del",
        int(msg["index"]),
        str(msg.get_attr("IFLA_IFNAME")),
        msg.get_attr("IFLA_IFALIAS"),
        int(msg.get_attr("IFLA_MASTER") or 0),
        str((info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""),
    )


def dump_links() -> list[LinkEvent]:
    """Every link now (in this thread's namespace), as 'new' events."""
    return [LinkEvent("new", link.index, link.name, link.alias, link.master, link.kind)
            for link in linkdump.dump()]


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
