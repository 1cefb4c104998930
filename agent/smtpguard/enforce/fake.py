"""An in-memory enforcer for unit tests of the code that drives a backend."""

from __future__ import annotations

import time
from typing import Any

from smtpguard.enforce import render
from smtpguard.enforce.desired import Action, Capabilities, Desired


class FakeEnforcer:
    name = "fake"
    reaches = frozenset({"bridge", "routed", "ovs", "macvtap"})

    def __init__(self, caps: Capabilities | None = None) -> None:
        self.caps = caps or Capabilities()
        self.applied: list[Desired] = []
        self.classes: dict[str, str] = {}
        self.state: dict[str, Action] = {}
        self.forgotten: set[str] = set()
        self.tables: dict[str, dict[str, Any] | None] = {f: None for f in render.FAMILIES}

    def apply(self, desired: Desired) -> None:
        self.applied.append(desired)
        self.classes = dict(desired.classes)
        self.state = dict(desired.actions)
        for fam in render.FAMILIES:
            self.tables[fam] = {"rules": sum(len(r) for r in render.chains(
                desired, fam, self.caps).values())}

    def set_vms(self, desired: Desired) -> None:
        self.classes = dict(desired.classes)

    def set_action(self, ifnames: list[str], action: Action | None,
                   classes: dict[str, str] | None = None, default_class: str = "default"
                   ) -> None:
        for n in ifnames:
            if action is None:
                self.state.pop(n, None)
            else:
                self.state[n] = action

    def actions(self) -> dict[str, Action]:
        now = time.time()
        return {k: a for k, a in self.state.items() if a.until is None or a.until > now}

    def drift(self, desired: Desired) -> list[str]:
        return [fam for fam, t in self.tables.items() if t is None or t["rules"] != sum(
            len(r) for r in render.chains(desired, fam, self.caps).values())]

    def disagreeing(self) -> set[str]:
        return set()

    def forget(self, ifnames: Any) -> None:
        self.forgotten |= set(ifnames)

    def blocked_counts(self) -> list[Any]:
        return []

    def report(self) -> tuple[list[Any], dict[tuple[str, str], tuple[int, int]], int]:
        return [], {}, 0
