"""Keeps the kernel's enforcement equal to the desired state: the policy,
the VM interfaces the agent knows (and their classes), the blocks and
throttles in force. Full applies on start, reload and repair; elements only
for per-VM changes."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from smtpguard import logs
from smtpguard.datapath.attachment import NETDEV_HOOK
from smtpguard.enforce.desired import Action, Capabilities, Desired
from smtpguard.errors import EnforcerError
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy.membership import facts_of, place
from smtpguard.policy.model import Policy


class Enforcer(Protocol):
    """What a backend does: NftablesEnforcer, IptablesEnforcer, FakeEnforcer.
    apply() is a full, idempotent apply that adopts what the kernel holds;
    set_vms() and set_action() change only what they name; actions() are the
    blocks and throttles in force; drift() names the parts that differ from
    what was applied (edited behind our back); disagreeing() the interfaces
    whose state differs between the backend's own tables (families);
    blocked_counts() and report() read the rejection counters."""

    name: str
    caps: Capabilities
    # How a VM may be plugged in for this backend to enforce on it
    # (datapath/attachment.py); a VM plugged in otherwise is counted only.
    reaches: frozenset[str]

    def apply(self, desired: Desired) -> None: ...
    def set_vms(self, desired: Desired) -> None: ...
    def set_action(self, ifnames: list[str], action: Action | None,
                   classes: dict[str, str] | None = None, default_class: str = "default"
                   ) -> None: ...
    def actions(self) -> dict[str, Action]: ...
    def drift(self, desired: Desired) -> list[str]: ...
    def disagreeing(self) -> set[str]: ...
    def forget(self, ifnames: Any) -> None: ...
    def blocked_counts(self) -> list[Any]: ...
    def report(self) -> tuple[list[Any], dict[tuple[str, str], tuple[int, int]], int]: ...


class Keeper:
    """The VMs' blocks and throttles (by VM id) are the truth; the kernel's
    per-interface elements are their rendering onto wherever each VM is now.

    A VM's interface that appears gets the VM's class and action at once; one
    that goes loses its elements at once, so a name the hypervisor hands out
    again starts clean. The kernel is read back at start only to adopt what a
    store cannot say (no store), and periodically to compare with what it
    should hold: a difference is repaired and counted (verify())."""

    def __init__(self, enforcer: Enforcer, policy: Policy,
                 clock: Callable[[], float] = time.monotonic, repair_every: float = 10.0,
                 wall: Callable[[], float] = time.time) -> None:
        self.enforcer = enforcer
        self.policy = policy
        self.classes: dict[str, str] = {}  # ifname -> class (its VM's)
        self.vm_actions: dict[str, Action] = {}  # vm id -> block/throttle in force
        self.ifaces: Mapping[int, VmIface] = {}
        self.clock = clock
        self.wall = wall
        self.repair_every = repair_every
        self.repairs: dict[str, int] = {"missing": 0, "unexpected": 0, "changed": 0}
        self._dirty = False
        self._next_repair = 0.0
        self._unreached: set[str] = set()  # interfaces logged as out of this backend's reach
        self.log = logs.get(backend=enforcer.name)

    def _rendered(self) -> dict[str, Action]:
        """ifname -> action: each VM's action on each of its interfaces now."""
        now = self.wall()
        return {v.ifname: a for v in self.ifaces.values()
                if (a := self.vm_actions.get(v.vm)) is not None
                and (a.until is None or a.until > now)}

    def desired(self) -> Desired:
        return Desired(self.policy, dict(self.classes), self._rendered(), self._groups(),
                       self._hooks())

    def _hooks(self) -> dict[str, str]:
        """ifname -> the device hook (netdev family) its VM's packets need."""
        return {v.ifname: NETDEV_HOOK[v.attachment] for v in self.ifaces.values()
                if v.attachment in NETDEV_HOOK}

    def reaches(self, vif: VmIface) -> bool:
        """Whether this backend enforces on the VM behind vif where it is plugged in."""
        return vif.attachment in self.enforcer.reaches

    def _say_unreached(self) -> None:
        """Log once per interface a VM this backend counts but cannot stop."""
        now = {v.ifname: v for v in self.ifaces.values() if not self.reaches(v)}
        for ifname in sorted(set(now) - self._unreached):
            v = now[ifname]
            self.log.warning("vm.unenforced", vm=v.vm, interface=ifname,
                             attachment=v.attachment, backend=self.enforcer.name,
                             hint="only the nftables backend enforces on Open vSwitch "
                             "ports and macvtaps: counted and detected, never stopped")
        self._unreached = set(now)

    def _groups(self) -> dict[str, str]:
        """ifname -> vm for VMs with several interfaces (one ceiling for all)."""
        by_vm: dict[str, list[str]] = {}
        for v in self.ifaces.values():
            by_vm.setdefault(v.vm, []).append(v.ifname)
        return {n: vm for vm, names in by_vm.items() if len(names) > 1 for n in names}

    def start(self, ifaces: Mapping[int, VmIface],
              truth: Mapping[str, Action] | None = None) -> None:
        """Apply the VMs' state onto the interfaces present. truth: the
        actions in force by VM (from the store); None when there is no store,
        and then what the kernel holds on a VM's interface is adopted."""
        self.ifaces = dict(ifaces)
        self.classes = self._classes(ifaces)
        self._say_unreached()
        adopted = 0
        if truth is None:
            by_name = {v.ifname: v.vm for v in ifaces.values()}
            for ifname, action in self.enforcer.actions().items():
                if ifname in by_name:
                    self.vm_actions.setdefault(by_name[ifname], action)
                    adopted += 1
        else:
            self.vm_actions = dict(truth)
        desired = self.desired()
        self.enforcer.apply(desired)
        self._next_repair = self.clock() + self.repair_every
        self.log.info("enforce.applied", reason="start", vms=len(self.classes),
                      actions=len(desired.actions), adopted_actions=adopted,
                      devices=len(desired.hooks),
                      reject_bridge=self.enforcer.caps.reject_bridge,
                      reject_inet=self.enforcer.caps.reject_inet,
                      reject_netdev=self.enforcer.caps.reject_netdev)

    def _classes(self, ifaces: Mapping[int, VmIface]) -> dict[str, str]:
        """One class per VM, whatever interface rules say of its other NICs."""
        by_vm: dict[str, list[VmIface]] = {}
        for v in ifaces.values():
            by_vm.setdefault(v.vm, []).append(v)
        out = {}
        for vm, vifs in by_vm.items():
            cls = place(self.policy, facts_of(vm, vifs)).cls
            out.update({v.ifname: cls for v in vifs})
        return out

    def policy_changed(self, policy: Policy, ifaces: Mapping[int, VmIface]) -> None:
        self.policy = policy
        self.ifaces = dict(ifaces)
        self.classes = self._classes(ifaces)
        self.enforcer.apply(self.desired())
        self._dirty = False
        self.log.info("enforce.applied", reason="policy", vms=len(self.classes))

    def ifaces_changed(self, ifaces: Mapping[int, VmIface]) -> None:
        """Interfaces came, went or changed hands: the new ones get their VM's
        action, the old ones lose theirs, before anything else happens."""
        before = {v.ifname: v.vm for v in self.ifaces.values()}
        after = {v.ifname: v.vm for v in ifaces.values()}
        hooks_before = self._hooks()
        self.ifaces = dict(ifaces)
        self._say_unreached()
        classes = self._classes(ifaces)
        nics = Counter(before.values())
        groups_before = {n: vm for n, vm in before.items() if nics[vm] > 1}
        if classes != self.classes or groups_before != self._groups() or \
                hooks_before != self._hooks():
            self.classes = classes
            self._dirty = True
        gone = sorted(n for n in before if n not in after)
        moved = sorted(n for n in after if before.get(n) != after[n])
        rendered = self._rendered()
        try:
            if gone or [n for n in moved if n in before and n not in rendered]:
                # Elements of a name that left (or whose VM changed) go at
                # once: the next VM given that name must not inherit them.
                self.enforcer.set_action(
                    gone + [n for n in moved if n in before and n not in rendered], None,
                    self.classes, self.policy.default_class)
            for n in moved:
                if n in rendered:
                    self.enforcer.set_action([n], rendered[n], self.classes,
                                             self.policy.default_class)
                    self.log.info("enforce.followed", vm=after[n], interface=n,
                                  action=rendered[n].kind, until=rendered[n].until)
        except EnforcerError as exc:
            self.log.error("enforce.follow_failed", error=str(exc))
            self._next_repair = 0.0  # verify() puts it right at the next tick
        if gone:
            try:
                self.enforcer.forget(gone)
            except EnforcerError as exc:
                self.log.error("enforce.forget_failed", error=str(exc))

    def set_action(self, vm: str, action: Action | None) -> None:
        """Block, throttle (until a wall-clock time, or until released) or
        release a VM: its record here, and its interfaces now."""
        if action is None:
            self.vm_actions.pop(vm, None)
        else:
            self.vm_actions[vm] = action
        ifnames = sorted(v.ifname for v in self.ifaces.values() if v.vm == vm)
        if ifnames:
            self.enforcer.set_action(ifnames, action, self.classes, self.policy.default_class)

    def flush(self) -> None:
        """Push pending class changes (vm_class elements only)."""
        if not self._dirty:
            return
        self.enforcer.set_vms(self.desired())
        self._dirty = False

    def repair(self) -> bool:
        """Periodically: if our tables or chains were flushed, deleted or
        edited behind our back, put them back; then compare each interface's
        block/throttle with its VM's (verify). True when it changed anything."""
        if self.clock() < self._next_repair:
            return False
        self._next_repair = self.clock() + self.repair_every
        missing = self.enforcer.drift(self.desired())
        if missing:
            self.enforcer.apply(self.desired())
            self.log.warning("enforce.repaired", missing=missing)
            return True
        return self.verify()

    def verify(self) -> bool:
        """What status says (the VMs' records) against what the kernel does
        (its elements): each difference is put right, logged and counted."""
        want = self._rendered()
        have = self.enforcer.actions()
        split = self.enforcer.disagreeing()
        now = self.wall()
        fixed = False
        for ifname in sorted(set(want) | set(have)):
            w, h = want.get(ifname), have.get(ifname)
            if ifname in split:
                h = None if w is not None else h  # one table lost it: missing there
            if w is not None and h is not None and w.kind == h.kind and (
                    (w.until is None) == (h.until is None)) and (
                    w.until is None or h.until is None or abs(w.until - h.until) < 2.0):
                continue
            if w is None and h is not None and h.until is not None and h.until <= now + 1:
                continue  # expiring in the kernel on its own this very second
            kind = "missing" if h is None else "unexpected" if w is None else "changed"
            vm = next((v.vm for v in self.ifaces.values() if v.ifname == ifname), None)
            self.repairs[kind] += 1
            self.log.warning("enforce.state_repaired", vm=vm, interface=ifname, kind=kind,
                             expected=None if w is None else w.kind,
                             found=None if h is None else h.kind)
            try:
                self.enforcer.set_action([ifname], w, self.classes, self.policy.default_class)
            except EnforcerError as exc:
                self.log.error("enforce.repair_failed", interface=ifname, error=str(exc))
            fixed = True
        return fixed
