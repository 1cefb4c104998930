"""Durations and rates written as people write them."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60,
          "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400,
          "days": 86400, "w": 604800, "week": 604800, "weeks": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(?:(\d+(?:\.\d+)?)\s*)?([a-z]+)\s*$")


def parse_duration(value: object) -> float:
    """'90s', '5m', '1.5h', '1d', '2w' or a number of seconds -> seconds (> 0)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 1h, 1d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value.lower())) and m.group(2) in _UNITS:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration like 30s, 5m, 1h, 1d")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Rate:
    """Events per period, e.g. 20/minute."""

    count: float
    per_seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.per_seconds

    def __str__(self) -> str:
        names = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}
        per = names.get(int(self.per_seconds)) if float(self.per_seconds).is_integer() else None
        return f"{self.count:g}/{per or format_duration(self.per_seconds)}"


def parse_rate(value: object) -> Rate:
    """'20/minute', '600/hour', '5/s', '100/10m' -> Rate (count > 0)."""
    if isinstance(value, Rate):
        return value
    if not isinstance(value, str) or not (m := _RATE.match(value.lower())):
        raise ValueError(f"{value!r} is not a rate like 20/minute, 600/hour, 5/second")
    count, mult, unit = float(m.group(1)), m.group(2), m.group(3)
    if unit not in _UNITS:
        raise ValueError(f"{value!r}: unknown unit {unit!r} (second, minute, hour, day)")
    if count <= 0:
        raise ValueError("a rate must be positive (use port25: block to forbid)")
    per = (float(mult) if mult else 1.0) * _UNITS[unit]
    if per <= 0:
        raise ValueError("a rate's period must be positive")
    return Rate(count, per)
