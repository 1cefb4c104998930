"""Which VM an interface belongs to: the sources in order of strength.

1. the interface's ifalias, when it names the VM (the operator's tooling
   said so explicitly; it overrides everything);
2. a hypervisor source that knows the interface (libvirt, Proxmox, OVSDB);
3. the policy's pattern capture (`tap{vm}i*`), else the interface name,
   the last resort, as a hypervisor may hand that name to another VM.
A tenant from the ifalias is kept whichever source names the VM.

uncovered() gathers the VMs the sources know whose traffic never crosses the
host kernel (nothing to count or enforce on this host), to be reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from smtpguard import logs
from smtpguard.inventory import patterns
from smtpguard.inventory.identity import Identity, IdentitySource, Uncovered
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.model import InterfacePattern


class Resolver:
    """Names VM interfaces from the sources it is given (started by start())."""

    def __init__(self, sources: Sequence[IdentitySource] = ()) -> None:
        self.sources = list(sources)
        self.log = logs.get()

    def start(self, on_change: Callable[[], None]) -> None:
        for s in self.sources:
            try:
                s.start(on_change)
            except Exception as exc:  # one source's failure never stops the agent
                self.log.error("inventory.start_failed", source=s.name, error=str(exc))

    def wait_settled(self, timeout: float) -> None:
        """At start: give sources that connect in the background (libvirt) up
        to timeout to say what they know, so a VM's interface is named by its
        VM from the first, not by its vnetN for a moment."""
        deadline = time.monotonic() + timeout
        for s in self.sources:
            ev = getattr(s, "settled", None)
            if ev is not None and not ev.wait(max(0.0, deadline - time.monotonic())):
                self.log.warning("inventory.not_settled", source=s.name, waited=timeout)

    def stop(self) -> None:
        for s in self.sources:
            try:
                s.stop()
            except Exception:
                self.log.debug("inventory.stop_failed", source=s.name, exc_info=True)

    def status(self) -> dict[str, bool]:
        """source -> whether it reaches its hypervisor now."""
        return {s.name: s.available() for s in self.sources}

    def uncovered(self) -> list[Uncovered]:
        """The VMs whose traffic bypasses the host kernel, by vm. Several
        sources may see the same interface (libvirt's vhostuser NIC is also
        an OVS vhost-user port): for a VM and reason the strongest source's
        entries stand. A source that fails is logged and skipped."""
        out: list[Uncovered] = []
        seen: set[tuple[str, str]] = set()
        for s in self.sources:
            ask = getattr(s, "uncovered", None)
            if ask is None:
                continue
            try:
                found: list[Uncovered] = list(ask())
            except Exception as exc:
                self.log.error("inventory.uncovered_failed", source=s.name, error=str(exc))
                continue
            out += [u for u in found if (u.vm, u.reason) not in seen]
            seen |= {(u.vm, u.reason) for u in found}
        return sorted(out, key=lambda u: (u.vm, u.reason, u.detail))

    def identify(self, ifindex: int, ifname: str, ifalias: str | None,
                 pats: Sequence[InterfacePattern], vm_from_ifalias: bool = True,
                 mac: str | None = None) -> VmIface | None:
        """The VM behind a VM-facing interface; None for other interfaces."""
        m = patterns.match(ifname, ifalias, pats, vm_from_ifalias)
        if m is None:
            return None
        ident = m.alias or self._from_sources(ifname, mac) or m.identity
        if m.alias_tenant and ident.tenant is None:
            ident = replace(ident, tenant=m.alias_tenant)
        return from_identity(ifindex, ifname, m.pattern, ident)

    def _from_sources(self, ifname: str, mac: str | None) -> Identity | None:
        for s in self.sources:
            try:
                found = s.lookup(ifname, mac)
            except Exception as exc:
                self.log.error("inventory.lookup_failed", source=s.name, interface=ifname,
                               error=str(exc))
                continue
            if found is not None:
                return found
        return None


def from_identity(ifindex: int, ifname: str, pattern: str, ident: Identity) -> VmIface:
    return VmIface(ifindex, ifname, ident.id, pattern, ident.tenant, name=ident.name,
                   source=ident.source, uuid=ident.uuid, cls=ident.cls,
                   facts=tuple(sorted(ident.facts.items())))
