"""Prometheus metrics, read from the BPF maps and our tables at scrape time:
what the collectors (datapath_metrics, enforcement_metrics, trip_metrics) share
and the /metrics endpoint that serves them."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from smtpguard.inventory.identity import UNCOVERED_REASONS

OUTCOMES = ("completed", "reset", "no_answer")


@dataclass(frozen=True)
class Health:
    policy_generation: int = 1
    reloads: Mapping[str, int] = field(default_factory=dict)
    vm_states: Mapping[str, str] = field(default_factory=dict)  # vm -> state
    actions: Mapping[str, int] = field(default_factory=dict)  # action -> count
    loop_seconds: tuple[tuple[float, ...], float, int] = ((), 0.0, 0)  # buckets, sum, count
    last_loop: float = 0.0  # wall clock of the last detection step
    unattached: int = 0  # VM-facing interfaces the classifier could not be attached to
    uncovered: Mapping[str, int] = field(default_factory=dict)  # reason -> VMs
    unenforced: Mapping[str, int] = field(default_factory=dict)  # attachment -> interfaces


STATES = ("ok", "flagged", "throttled", "blocked")
UNCOVERED = UNCOVERED_REASONS  # why a VM's traffic never crosses the host kernel
LOOP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


G = TypeVar("G", bound=Hashable)  # what a host total is labelled by


class Totals(Generic[G]):
    """Per-host sums of per-interface kernel counters that never go down
    within the agent's life: each update adds what every entry gained since
    the last one, so an entry that goes away (its interface forgotten) keeps
    what it added, and one that comes back lower (recreated) adds from zero.

    A sum starts at the first update, so a restarted agent's totals start
    again at zero, which Prometheus reads as the counter reset it is
    (starting from the kernel's figures instead would count every VM's
    history again whenever an interface had been forgotten meanwhile). Not
    thread-safe: the collectors update it under their lock, in read order."""

    def __init__(self) -> None:
        self._started = False
        self._last: dict[Hashable, tuple[int, ...]] = {}  # source -> its values then
        self._sums: dict[G, list[int]] = {}

    def update(self, current: Iterable[tuple[G, Hashable, tuple[int, ...]]],
               always: Iterable[G] = (), width: int = 1) -> dict[G, list[int]]:
        """(group, source, values) for every entry now -> group -> sums;
        the `always` groups are there from the start (at zero), so that the
        first attempts on a port are an increase Prometheus sees, not the
        first sample of a new series."""
        last, seen, sums = self._last, {}, self._sums
        for group in always:
            sums.setdefault(group, [0] * width)
        for group, source, values in current:
            seen[source] = values
            was = last.get(source)
            if was == values:
                continue  # most entries, most scrapes
            acc = sums.get(group)
            if acc is None:
                acc = sums[group] = [0] * len(values)
            if was is None:
                if not self._started:
                    continue  # the baseline
                delta: Iterable[int] = values
            elif any(v < w for v, w in zip(values, was, strict=True)):
                delta = values  # recreated: all it has is new
            else:
                delta = (v - w for v, w in zip(values, was, strict=True))
            for i, d in enumerate(delta):
                acc[i] += d
        self._last = seen
        self._started = True
        return {g: list(v) for g, v in sums.items()}


class Activity:
    """Which VMs get per-VM series: those with an SMTP attempt within the
    window, and those not in state ok, as of the datapath's read. The
    enforcement collector's scrape comes first (rejections read before
    attempts); once it has read its counters it calls prepare(), which reads
    the datapath for this scrape, so both decide from the same read."""

    def __init__(self) -> None:
        self.exported: frozenset[str] = frozenset()
        self.ports: tuple[int, ...] = ()  # the policy's SMTP ports
        self.prepare: Callable[[], None] = lambda: None
        # VMs the classifier has counted at all: one it never did (its
        # interface came while no agent ran) still gets its blocked series.
        self.counted: frozenset[str] = frozenset()


def parse_addr(addr: str) -> tuple[str, int]:
    """'127.0.0.1:9725', '[::1]:9725' or ':9725' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {addr!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    ipaddress.ip_address(host)
    return host, int(port)


def serve(addr: str, *collectors: Collector) -> Any:
    """Start the /metrics endpoint; returns the HTTP server (its port, for :0)."""
    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
