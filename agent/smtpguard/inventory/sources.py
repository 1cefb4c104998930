"""The identity sources a policy's `inventory:` section asks for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from smtpguard import logs
from smtpguard.inventory import ovs
from smtpguard.inventory.identity import IdentitySource
from smtpguard.policy.model import Inventory


def from_policy(inv: Inventory) -> list[IdentitySource]:
    """`auto` takes libvirt where its Python binding is installed (libvirtd
    itself may come later: the source connects when it can) and Proxmox where
    its config root exists, OVSDB where its socket is there or Open vSwitch
    is installed (ovsdb-server may come later: the source connects when it
    can)."""
    out: list[IdentitySource] = []
    lv = inv.libvirt
    if lv.enabled is True or (lv.enabled == "auto"
                              and importlib.util.find_spec("libvirt") is not None):
        from smtpguard.inventory.libvirt import LibvirtSource

        out.append(LibvirtSource(lv.uri))
    px = inv.proxmox
    if px.enabled is True or (px.enabled == "auto" and Path(px.root).is_dir()):
        from smtpguard.inventory.proxmox import ProxmoxSource

        out.append(ProxmoxSource(Path(px.root), tenant_prefix=px.tenant_prefix,
                                 class_prefix=px.class_prefix))
    ov = inv.ovs
    if ov.enabled is True or (ov.enabled == "auto" and ovs.present(ov.db)):
        out.append(ovs.OvsSource(ov.db))
    logs.get().info("inventory.sources", sources=[s.name for s in out] or ["patterns"])
    return out
