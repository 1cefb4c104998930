"""Keeps the kernel's enforcement equal to the desired state: the policy,
the VM interfaces the agent knows (and their classes), the blocks and
throttles in force. Full applies on start, reload and repair; elements only
for per-VM changes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from smtpguard import logs
from smtpguard.datapath.interfaces import VmIface
from smtpguard.enforce.desired import Action, Capabilities, Desired
from smtpguard.errors import EnforcerError
from smtpguard.policy.membership import VmFacts, place
from smtpguard.policy.model import Policy


class Enforcer(Protocol):
    """What a backend does: NftablesEnforcer, IptablesEnforcer, FakeEnforcer.
    apply() is a full, idempotent apply that adopts what the kernel holds;
    set_vms() and set_action() change only what they name; actions() are the
    blocks and throttles in force; drift() names the parts that differ from
    what was applied (edited behind our back); blocked_counts() and report()
    read the rejection counters."""

    name: str
    caps: Capabilities

    def apply(self, desired: Desired) -> None: ...
    def set_vms(self, desired: Desired) -> None: ...
    def set_action(self, ifnames: list[str], action: Action | None,
                   classes: dict[str, str] | None = None, default_class: str = "default"
                   ) -> None: ...
    def actions(self) -> dict[str, Action]: ...
    def drift(self, desired: Desired) -> list[str]: ...
    def forget(self, ifnames: Any) -> None: ...
    def blocked_counts(self) -> list[Any]: ...
    def report(self) -> tuple[list[Any], dict[tuple[str, str], tuple[int, int]], int]: ...


class Keeper:
    def __init__(self, enforcer: Enforcer, policy: Policy,
                 clock: Callable[[], float] = time.monotonic, repair_every: float = 10.0) -> None:
        self.enforcer = enforcer
        self.policy = policy
        self.classes: dict[str, str] = {}
        self.clock = clock
        self.repair_every = repair_every
        self._dirty = False
        self._next_repair = 0.0
        self.log = logs.get(backend=enforcer.name)

    def desired(self) -> Desired:
        """Blocks and throttles are read back from the kernel, where they
        expire on their own: whatever is in force there stays in force."""
        return Desired(self.policy, dict(self.classes), self.enforcer.actions())

    def start(self, ifaces: Mapping[int, VmIface]) -> None:
        """Adopt what the kernel holds (tables, blocks, counters), then apply."""
        self.classes = self._classes(ifaces)
        desired = self.desired()
        self.enforcer.apply(desired)
        self._next_repair = self.clock() + self.repair_every
        self.log.info("enforce.applied", reason="start", vms=len(self.classes),
                      adopted_actions=len(desired.actions), reject_bridge=self.enforcer.caps
                      .reject_bridge, reject_inet=self.enforcer.caps.reject_inet)

    def _classes(self, ifaces: Mapping[int, VmIface]) -> dict[str, str]:
        return {v.ifname: place(self.policy, VmFacts(v.vm, v.ifname, tenant=v.tenant)).cls
                for v in ifaces.values()}

    def policy_changed(self, policy: Policy, ifaces: Mapping[int, VmIface]) -> None:
        self.policy = policy
        self.classes = self._classes(ifaces)
        self.enforcer.apply(self.desired())
        self._dirty = False
        self.log.info("enforce.applied", reason="policy", vms=len(self.classes))

    def ifaces_changed(self, ifaces: Mapping[int, VmIface]) -> None:
        classes = self._classes(ifaces)
        gone = set(self.classes) - set(classes)
        if classes != self.classes:
            self.classes = classes
            self._dirty = True
        if gone:
            try:
                self.enforcer.forget(gone)
            except EnforcerError as exc:
                self.log.error("enforce.forget_failed", error=str(exc))

    def set_action(self, ifnames: list[str], action: Action | None) -> None:
        """Block, throttle (until a wall-clock time, or until released) or release."""
        self.enforcer.set_action(ifnames, action, self.classes, self.policy.default_class)

    def flush(self) -> None:
        """Push pending class changes (vm_class elements only)."""
        if not self._dirty:
            return
        self.enforcer.set_vms(Desired(self.policy, dict(self.classes)))
        self._dirty = False

    def repair(self) -> bool:
        """Periodically: if our tables or chains were flushed, deleted or
        edited behind our back, put them back. True when it did."""
        if self.clock() < self._next_repair:
            return False
        self._next_repair = self.clock() + self.repair_every
        missing = self.enforcer.drift(self.desired())
        if not missing:
            return False
        self.enforcer.apply(self.desired())
        self.log.warning("enforce.repaired", missing=missing)
        return True
