"""Which class a VM belongs to: the first `members` rule that matches."""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass

from smtpguard.policy.model import Member, Policy


@dataclass(frozen=True)
class VmFacts:
    """What the host knows about a VM; unknown facts never match a rule."""

    vm: str
    interface: str | None = None
    mac: str | None = None
    ips: tuple[str, ...] = ()
    tenant: str | None = None


@dataclass(frozen=True)
class Placement:
    cls: str
    rule: int | None  # index in policy.members; None: default_class


def _matches(rule: Member, f: VmFacts) -> bool:
    if rule.vm is not None and not fnmatch.fnmatchcase(f.vm, rule.vm):
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
    """First match wins; everyone else gets default_class."""
    for i, rule in enumerate(policy.members):
        if _matches(rule, facts):
            return Placement(rule.cls, i)
    return Placement(policy.default_class, None)
