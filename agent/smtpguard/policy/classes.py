"""A VM class: its port-25 mode, its ceilings, its detection thresholds and
their escalation; and the membership rules that put VMs in a class."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from smtpguard.policy.fields import (
    AT,
    Action,
    Duration,
    HostAddress,
    MacAddress,
    Metric,
    Mode,
    Name,
    Network,
    Port,
    Port25Mode,
    RateField,
    Strict,
)
from smtpguard.policy.units import Rate, format_duration

MAX_WINDOW = 86400.0
MIN_WINDOW = 10.0
MAX_DEST_WINDOW = 3600.0  # the datapath's destination sketches cover an hour


class Ceiling(Strict):
    """New connections allowed: a rate and a burst."""

    rate: RateField
    burst: int = Field(ge=1, le=100_000)


class Threshold(Strict):
    name: Name | None = None
    metric: Metric
    window: Duration
    at_least: int = Field(ge=1, le=10_000_000)
    action: Action
    duration: Duration | None = None

    @model_validator(mode="after")
    def _check(self) -> Threshold:
        if not MIN_WINDOW <= self.window <= MAX_WINDOW:
            raise ValueError(f"{AT}window: must be between 10s and 1d")
        if self.metric == "destinations" and self.window > MAX_DEST_WINDOW:
            raise ValueError(f"{AT}window: destinations are counted over at most 1h")
        if self.action == "block" and self.duration is None:
            raise ValueError(f"{AT}duration: a block needs a duration (e.g. 1h)")
        if self.action == "flag" and self.duration is not None:
            raise ValueError(f"{AT}duration: a flag has no duration")
        return self

    @property
    def label(self) -> str:
        return self.name or f"{self.metric}_{format_duration(self.window)}"


class Escalation(Strict):
    """Repeat offenders: each new block lasts `factor` times the previous one,
    up to `max`; offences older than `forget_after` no longer count."""

    factor: float = Field(default=2.0, ge=1.0, le=10.0)
    max: Duration = 7 * 86400.0
    forget_after: Duration = 30 * 86400.0


DEFAULT_THRESHOLDS = (
    Threshold(name="fanout", metric="destinations", window=60, at_least=100, action="block",
              duration=3600),
    Threshold(name="hammering", metric="blocked_attempts", window=600, at_least=500,
              action="block", duration=6 * 3600),
    Threshold(name="burst", metric="attempts", window=60, at_least=300, action="throttle",
              duration=3600),
    Threshold(name="volume", metric="attempts", window=60, at_least=60, action="flag"),
    Threshold(name="blocked_port", metric="blocked_attempts", window=600, at_least=50,
              action="flag"),
    Threshold(name="refused", metric="failed_handshakes", window=600, at_least=50,
              action="flag"),
)


class VmClass(Strict):
    mode: Mode | None = None  # None: the policy's mode
    port25: Port25Mode = "block"
    redirect_to: tuple[HostAddress, ...] = ()  # port25: redirect -> this relay (one per family)
    limit: Ceiling | None = Ceiling(rate=Rate(20, 60), burst=10)
    limited_ports: tuple[Port, ...] = (465, 587, 2525)
    throttle: Ceiling = Ceiling(rate=Rate(5, 60), burst=5)
    thresholds: tuple[Threshold, ...] = DEFAULT_THRESHOLDS
    escalation: Escalation = Escalation()

    @model_validator(mode="after")
    def _check(self) -> VmClass:
        if 25 in self.limited_ports:
            raise ValueError(f"{AT}limited_ports: port 25 is governed by port25:, not listed here")
        if len(set(self.limited_ports)) != len(self.limited_ports):
            raise ValueError(f"{AT}limited_ports: ports are listed more than once")
        if self.port25 == "redirect" and not self.redirect_to:
            raise ValueError(f"{AT}redirect_to: port25: redirect needs the relay to send to")
        if self.redirect_to and self.port25 != "redirect":
            raise ValueError(f"{AT}redirect_to: only used with port25: redirect")
        if len({a.version for a in self.redirect_to}) != len(self.redirect_to):
            raise ValueError(f"{AT}redirect_to: at most one IPv4 and one IPv6 address")
        if self.limit is None and (self.port25 == "limit" or self.limited_ports):
            raise ValueError(f"{AT}limit: port25: limit and limited_ports need a limit")
        if self.limit and self.throttle.rate.per_second >= self.limit.rate.per_second:
            raise ValueError(f"{AT}throttle.rate: {self.throttle.rate} must be tighter than "
                             f"the limit, {self.limit.rate}")
        labels = [t.label for t in self.thresholds]
        keys = [(t.metric, t.window, t.at_least, t.action) for t in self.thresholds]
        for i, t in enumerate(self.thresholds):
            if labels[i] in labels[:i]:
                raise ValueError(f"{AT}thresholds.{i}.name: {labels[i]!r} is used twice")
            if keys[i] in keys[:i]:
                raise ValueError(f"{AT}thresholds.{i}: repeats thresholds.{keys.index(keys[i])}")
            if t.action == "block" and t.duration is not None and \
                    t.duration > self.escalation.max:
                raise ValueError(f"{AT}thresholds.{i}.duration: longer than escalation.max "
                                 f"({format_duration(self.escalation.max)})")
        return self


class Member(Strict):
    """One class-membership rule; every criterion given must match."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    cls: Name = Field(alias="class")
    vm: str | None = Field(default=None, min_length=1)
    interface: str | None = Field(default=None, min_length=1)
    mac: MacAddress | None = None
    ip: Network | None = None
    tenant: str | None = Field(default=None, min_length=1)
    uuid: Annotated[str, BeforeValidator(lambda v: str(v).lower())] | None = None

    @model_validator(mode="after")
    def _some_criterion(self) -> Member:
        if not any((self.vm, self.interface, self.mac, self.ip, self.tenant, self.uuid)):
            raise ValueError("a rule needs at least one of vm, interface, mac, ip, tenant, "
                             "uuid (default_class covers everyone else)")
        return self

