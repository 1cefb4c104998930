"""The policy schema (version 1). Strict: unknown keys are errors."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")


def parse_duration(value: object) -> float:
    """'90s', '5m', '1.5h', '1d' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 1h, 1d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration like 30s, 5m, 1h, 1d")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class InterfacePattern(Strict):
    """A VM-facing interface name pattern: a glob whose {vm} part names the VM."""

    pattern: str = Field(min_length=1, max_length=64)

    @field_validator("pattern")
    @classmethod
    def _one_capture(cls, v: str) -> str:
        if v.count("{vm}") > 1 or re.search(r"\{(?!vm\})", v):
            raise ValueError("only one {vm} capture is allowed, and no other braces")
        return v

    def regex(self) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\{vm\}|\*|\?)", self.pattern):
            if part == "{vm}":
                out += r"(?P<vm>.+?)"
            elif part == "*":
                out += ".*"
            elif part == "?":
                out += "."
            else:
                out += re.escape(part)
        return re.compile(f"^{out}$")


DEFAULT_PATTERNS = (
    InterfacePattern(pattern="tap{vm}i*"),  # Proxmox: tap<vmid>i<n>
    InterfacePattern(pattern="vnet*"),  # libvirt
    InterfacePattern(pattern="tap{vm}"),  # OpenStack: tap<port-id prefix>
    InterfacePattern(pattern="fc-{vm}"),  # Firecracker
    InterfacePattern(pattern="veth*"),  # containers, the lab
)


class Interfaces(Strict):
    patterns: tuple[InterfacePattern, ...] = DEFAULT_PATTERNS
    vm_from_ifalias: bool = True


class Datapath(Strict):
    no_answer_after: Duration = 2.0


class Policy(Strict):
    version: int = Field(default=1, ge=1, le=1)
    smtp_ports: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = (25, 465, 587, 2525)
    interfaces: Interfaces = Interfaces()
    datapath: Datapath = Datapath()

    @field_validator("smtp_ports")
    @classmethod
    def _distinct(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("at least one SMTP port is needed")
        if len(set(v)) != len(v):
            raise ValueError("ports are listed more than once")
        return v
