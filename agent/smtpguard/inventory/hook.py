"""The synchronous path from libvirt: its qemu hook announces a domain's taps
before QEMU starts, so the agent knows the VM before its first packet.

libvirt runs /etc/libvirt/hooks/qemu.d/* with `DOMAIN OP SUBOP EXTRA` and the
domain XML on stdin. At phase `start` (also for a restore or an incoming
migration) the taps exist with their final names and QEMU is not running
yet; the hook (`smtpguard libvirt-hook`) hands the XML to the agent over the
control socket and waits for it to have named the taps and put the VM's
block or throttle on them. Events from libvirt come ~200 ms after the tap,
and on a restore only milliseconds before the guest's first frame (measured
here): they alone cannot guarantee the first SYN meets the VM's state.

The hook must not call libvirt (the domain is locked while it runs; every
API call on it blocks), and neither may the agent while answering it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from smtpguard.inventory import domxml
from smtpguard.inventory.identity import Identity

START_OPS = ("prepare", "start", "restore", "migrate")
STOP_OPS = ("stopped", "release")


class HookSource:
    """What the hook announced: tap -> Identity, by domain UUID."""

    name = "libvirt-hook"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_dom: dict[str, dict[str, Identity]] = {}

    def start(self, on_change: Callable[[], None]) -> None:
        """Nothing to watch: announce() is called by the control command."""

    def stop(self) -> None:
        pass

    def available(self) -> bool:
        return True

    def announce(self, op: str, xml: str) -> list[str]:
        """A domain starting (its taps with their identity) or stopping (its
        taps forgotten). Returns the taps named."""
        found = domxml.interfaces(xml)
        uuid = next(iter(found.values())).id if found else domxml_uuid(xml)
        with self._lock:
            if op in STOP_OPS:
                gone = self._by_dom.pop(uuid, {})
                return sorted(gone)
            self._by_dom[uuid] = found
            # A tap name now given to this domain belongs to no other.
            for other, taps in self._by_dom.items():
                if other != uuid:
                    for t in set(taps) & set(found):
                        del taps[t]
        return sorted(found)

    def lookup(self, ifname: str, mac: str | None = None) -> Identity | None:
        with self._lock:
            for taps in self._by_dom.values():
                if ifname in taps:
                    return taps[ifname]
        return None


def domxml_uuid(xml: str) -> str:
    """The domain's UUID, lower case ('' when it has none)."""
    import xml.etree.ElementTree as ET

    try:
        node = ET.fromstring(xml).find("uuid")
    except ET.ParseError:
        return ""
    return (node.text or "").strip().lower() if node is not None else ""
