"""Who a VM is: a stable id, a display name and a tenant, and where that came from.

An interface is where a VM is now, not who it is: hypervisors hand interface
names out again (libvirt's `vnetN`), so everything smtpguard remembers about a
VM (state, windows, offences, incidents, operator actions, metrics) is keyed by
`Identity.id`. The sources that know VMs (libvirt, Proxmox, Open vSwitch's
database, the interface's ifalias, the policy's name patterns) live beside
this module; resolve.py says which one wins.

A VM whose traffic never crosses the host kernel (vhost-user, an SR-IOV VF
passed through, vDPA) has no interface smtpguard can
count or enforce on: the sources that can tell report it as `Uncovered`, so
it is shown, never silently skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Which kind of fact named a VM, strongest first.
SOURCES = ("ifalias", "libvirt", "proxmox", "ovs", "pattern", "ifname")

# Why an Uncovered VM's traffic bypasses the host kernel.
UNCOVERED_REASONS = ("vhost-user", "hostdev", "vdpa")


@dataclass(frozen=True)
class Identity:
    """A VM as a hypervisor (or the policy) names it.

    id: stable across restarts and interface changes (a libvirt domain UUID, a
    Proxmox VMID, a pattern capture, an ifalias); never an interface name that
    the hypervisor reuses, except as the last resort (source "ifname").
    facts: what else the source knows, for the policy's `members` rules
    (e.g. {"domain": "web1", "uuid": "...", "vmid": "100"})."""

    id: str
    name: str
    source: str
    tenant: str | None = None
    cls: str | None = None  # a class the hypervisor asks for (libvirt metadata, Proxmox tag)
    uuid: str | None = None
    facts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Uncovered:
    """A VM with an interface whose traffic bypasses the host kernel, so
    nothing can be counted or enforced for it on this host.

    vm: the VM's stable id (as Identity.id); name: its display name; reason:
    one of UNCOVERED_REASONS; source: the IdentitySource that saw it; detail:
    which interface (a vhost-user socket, a PCI address, a device...)."""

    vm: str
    name: str
    reason: str
    source: str
    tenant: str | None = None
    detail: str = ""


class IdentitySource(Protocol):
    """A hypervisor's view of which VM an interface belongs to.

    lookup() answers from what the source knows now and must not block for
    long (the agent calls it on every new interface); start() begins watching
    the hypervisor and calls on_change (from any thread) whenever a mapping may
    have changed, so the agent looks its interfaces up again; stop() lets go.
    available() says whether the source reaches its hypervisor right now.

    A source MAY also have `uncovered() -> list[Uncovered]`: the VMs it knows
    whose traffic never crosses the host kernel. Like lookup() it answers from
    its cache and never blocks; the Resolver asks with getattr, so a source
    without it reports none."""

    name: str

    def start(self, on_change: Callable[[], None]) -> None: ...
    def stop(self) -> None: ...
    def available(self) -> bool: ...
    def lookup(self, ifname: str, mac: str | None = None) -> Identity | None: ...
