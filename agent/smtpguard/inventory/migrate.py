"""State kept by an earlier version under a name the policy alone gave (the
interface name, a pattern capture) moves to the VM's id, once: at the first
start that knows ids, the VM on that interface is the one the name stood for.
Later, a name is never followed to another VM (what stays under an old name
belonged to a VM that was not running then)."""

from __future__ import annotations

from collections.abc import Iterable

from smtpguard import logs
from smtpguard.errors import SmtpguardError
from smtpguard.inventory import patterns
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.model import Interfaces
from smtpguard.respond.store import Store

DONE = "vm_ids"  # the store's meta key once migrated


def to_ids(store: Store, ifaces: Iterable[VmIface], naming: Interfaces) -> int:
    """Rename what the store keeps under legacy names; returns how many VMs."""
    log = logs.get()
    try:
        if store.meta(DONE) == "1":
            return 0
        store.set_meta(DONE, "1")
    except SmtpguardError as exc:
        log.error("store.migrate_failed", error=str(exc))
        return 0
    moved = 0
    for v in ifaces:
        if v.source not in ("libvirt", "proxmox"):
            continue  # named by the policy's own naming, as before
        m = patterns.match(v.ifname, None, naming.patterns, naming.vm_from_ifalias)
        legacy = m.identity.id if m is not None else v.ifname
        try:
            if legacy != v.vm and store.rename_vm(legacy, v.vm):
                moved += 1
                log.info("store.migrated", vm=v.vm, name=v.display, was=legacy)
        except SmtpguardError as exc:
            log.error("store.migrate_failed", vm=v.vm, was=legacy, error=str(exc))
    return moved
