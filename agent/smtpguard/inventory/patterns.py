"""The policy's own naming: interface name patterns and the ifalias.

A pattern says which host interfaces face VMs (`interfaces.patterns`, first
match wins) and may capture the VM's name (`tap{vm}i*`); an ifalias set by
the operator's tooling (`web1`, or `vm=web1 tenant=acme`) names the VM and
its tenant, and overrides what any hypervisor source says.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from smtpguard.inventory.identity import Identity
from smtpguard.policy.model import InterfacePattern

_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,62}$")


@dataclass(frozen=True)
class Match:
    """A VM-facing interface, and what the policy's naming alone says of it."""

    pattern: str
    identity: Identity  # from the pattern capture, else the interface name
    alias: Identity | None  # from the ifalias, when it names the VM
    alias_tenant: str | None  # a tenant the ifalias gives (also without a name)


def match(ifname: str, ifalias: str | None, patterns: Sequence[InterfacePattern],
          vm_from_ifalias: bool = True) -> Match | None:
    """None when no pattern matches (not a VM interface)."""
    for p in patterns:
        m = p.regex().match(ifname)
        if not m:
            continue
        if "vm" in m.groupdict() and m.group("vm"):
            base = Identity(m.group("vm"), m.group("vm"), "pattern")
        else:
            base = Identity(ifname, ifname, "ifname")
        alias = parse_ifalias(ifalias) if vm_from_ifalias else {}
        named = None
        if "vm" in alias:
            named = Identity(alias["vm"], alias["vm"], "ifalias", tenant=alias.get("tenant"))
        return Match(p.pattern, base, named, alias.get("tenant"))
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
