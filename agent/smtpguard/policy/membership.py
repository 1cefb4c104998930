"""Which class a VM belongs to: the first `members` rule that matches."""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass
from typing import Any

from smtpguard.policy.classes import Member
from smtpguard.policy.model import Policy


@dataclass(frozen=True)
class VmFacts:
    """What the host knows about a VM; unknown facts never match a rule."""

    vm: str  # the VM's id
    interface: str | None = None
    mac: str | None = None
    ips: tuple[str, ...] = ()
    tenant: str | None = None
    name: str | None = None  # its display name (a libvirt domain's), when not the id
    uuid: str | None = None
    cls: str | None = None  # a class the hypervisor asks for (used when no rule matches)


@dataclass(frozen=True)
class Placement:
    cls: str
    rule: int | None  # index in policy.members; None: default_class


def _matches(rule: Member, f: VmFacts) -> bool:
    if rule.vm is not None and not any(
            fnmatch.fnmatchcase(n, rule.vm) for n in {f.vm, f.name or f.vm}):
        return False
    if rule.uuid is not None and (f.uuid or "").lower() != rule.uuid:
        return False
    if rule.interface is not None and (
            f.interface is None or not fnmatch.fnmatchcase(f.interface, rule.interface)):
        return False
    if rule.mac is not None and (f.mac or "").lower() != rule.mac:
        return False
    if rule.tenant is not None and f.tenant != rule.tenant:
        return False
    if rule.ip is not None:
        net = rule.ip
        addrs = [ipaddress.ip_address(a) for a in f.ips]
        if not any(a.version == net.version and a in net for a in addrs):
            return False
    return True


def place(policy: Policy, facts: VmFacts) -> Placement:
    """First match wins; then a class the hypervisor asks for (libvirt
    metadata, a Proxmox tag) if the policy defines it; else default_class."""
    for i, rule in enumerate(policy.members):
        if _matches(rule, facts):
            return Placement(rule.cls, i)
    if facts.cls is not None and facts.cls in policy.classes:
        return Placement(facts.cls, None)
    return Placement(policy.default_class, None)


def facts_of(vm: str, vifs: list[Any]) -> VmFacts:
    """What the agent knows of a VM from its interfaces (VmIface), the first
    by name standing for the VM where they differ."""
    vifs = sorted(vifs, key=lambda v: v.ifname)
    if not vifs:
        return VmFacts(vm)
    v = vifs[0]
    facts = dict(v.facts)
    return VmFacts(vm, v.ifname, mac=facts.get("mac"), tenant=v.tenant,
                   name=v.name or None, uuid=v.uuid, cls=v.cls)
