"""The agent's configuration and the state its parts (agent, links, reload,
report) share: declared once here, set by Agent.__init__."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smtpguard.datapath.interfaces import LinkMonitor
from smtpguard.datapath.loader import Datapath, Sizes
from smtpguard.defaults import DEFAULT_METRICS, DEFAULT_PIN_DIR, DEFAULT_SOCKET, DEFAULT_STATE_DIR
from smtpguard.detect.engine import Detector
from smtpguard.enforce.keeper import Keeper
from smtpguard.inventory.hook import HookSource
from smtpguard.inventory.resolve import Resolver
from smtpguard.inventory.vmiface import VmIface
from smtpguard.policy import LoadedPolicy, Policy
from smtpguard.respond.responder import Responder


@dataclass
class AgentConfig:
    policy_path: Path | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    pin_dir: Path = DEFAULT_PIN_DIR
    bpffs: Path = Path("/sys/fs/bpf")
    metrics_addr: str | None = DEFAULT_METRICS
    tick: float = 1.0
    log_interval: float = 60.0
    sizes: Sizes = field(default_factory=Sizes)
    enforce: bool = True
    control_socket: Path | None = DEFAULT_SOCKET
    # Detection runs when the classifier rings (counts changed; see
    # datapath/doorbell.py), at most every 2x its last duration, never less
    # than wake_gap apart, and at least every detect_interval (windows age,
    # blocks expire).
    detect_interval: float = 1.0
    wake_gap: float = 0.01
    backend: str | None = None  # auto, nftables, iptables; None: the policy's


class AgentState:
    """The attributes the agent's parts read and write, the policy in force,
    and the one step each part asks of another (reconcile, from links)."""

    cfg: AgentConfig
    loaded: LoadedPolicy
    generation: int
    reloads: dict[str, int]
    clock: Callable[[], float]
    log: Any
    datapath: Datapath
    keeper: Keeper | None
    responder: Responder | None
    fleet: Any  # fleet.link.FleetLink, with a fleet section
    # Replaced, never mutated: the metrics thread reads it without a lock.
    ifaces: Mapping[int, VmIface]
    unattached: set[int]
    names: dict[str, str]  # vm id -> its name when last seen (status, CLI)
    hook: HookSource
    resolver: Resolver
    _ipr: Any
    _monitor: LinkMonitor
    _link_kinds: dict[int, str]
    _uncovered_said: set[tuple[str, str]]
    _reidentify: threading.Event
    _reload: threading.Event
    _forget: set[int]
    _last_logged: dict[int, tuple[int, ...]]
    _next_filter_check: float

    @property
    def policy(self) -> Policy:
        return self.loaded.policy

    def _policy_name(self) -> str:
        return str(self.cfg.policy_path) if self.cfg.policy_path else "built-in default"

    @property
    def detector(self) -> Detector | None:
        return None if self.responder is None else self.responder.detector

    def reconcile(self) -> None:
        """Implemented by Links (daemon/links.py)."""
        raise NotImplementedError
