"""What enforcement should be in the kernel: the policy, the known VM
interfaces and their classes, and the blocks and throttles in force."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from smtpguard.policy.model import Policy

ActionKind = Literal["block", "throttle"]


@dataclass(frozen=True)
class Action:
    """A block or throttle on one interface; `until` is wall-clock (epoch) seconds."""

    kind: ActionKind
    until: float | None = None  # None: until released

    def remaining(self, now: float) -> float | None:
        return None if self.until is None else self.until - now


@dataclass(frozen=True)
class Desired:
    policy: Policy
    classes: Mapping[str, str] = field(default_factory=dict)  # ifname -> class
    actions: Mapping[str, Action] = field(default_factory=dict)  # ifname -> action
    # ifname -> vm, for VMs with several interfaces: they share one ceiling
    groups: Mapping[str, str] = field(default_factory=dict)
    # ifname -> "ingress" | "egress": devices whose VM only the device's own
    # hook sees (Open vSwitch ports, macvtaps: datapath/attachment.py)
    hooks: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What this kernel's nftables can do in each of our tables."""

    reject_bridge: bool = True
    reject_inet: bool = True
    reject_netdev: bool = True  # at a device's ingress (nft_reject_netdev); egress drops
