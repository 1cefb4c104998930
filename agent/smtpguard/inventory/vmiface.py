"""A VM-facing interface and the VM it belongs to: what the resolver
(resolve.py) hands the agent, and what detection, enforcement, metrics and
the fleet key their view of the host's VMs on."""

from __future__ import annotations

from dataclasses import dataclass

from smtpguard.datapath.attachment import Attachment


@dataclass(frozen=True)
class VmIface:
    """A VM-facing interface and the VM it belongs to now.

    vm is the VM's stable id (inventory/identity.py): what state, windows,
    incidents, operator actions and metrics key on. name is what people read
    (a libvirt domain name; the id itself when nothing better is known)."""

    ifindex: int
    ifname: str
    vm: str
    pattern: str
    tenant: str | None = None
    name: str = ""
    source: str = "pattern"
    uuid: str | None = None
    cls: str | None = None  # a class the hypervisor asks for
    facts: tuple[tuple[str, str], ...] = ()
    attachment: Attachment = "bridge"  # how it is plugged in (datapath/attachment.py)

    @property
    def display(self) -> str:
        return self.name or self.vm
