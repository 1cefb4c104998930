"""The policy's field types and its strict base model: what every section
of the schema (policy/model.py, policy/classes.py) is built from."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from smtpguard.policy.units import Rate, format_duration, parse_duration, parse_rate

# A ValueError whose message starts with "@a.b: " is reported at that sub-path
# of the object that raised it (policy/load.py), so cross-field errors point
# at the field that is wrong, not at the whole object.
AT = "@"

Duration = Annotated[float, BeforeValidator(parse_duration),
                     PlainSerializer(format_duration, return_type=str)]
RateField = Annotated[Rate, BeforeValidator(parse_rate), PlainSerializer(str, return_type=str)]
Port = Annotated[int, Field(ge=1, le=65535)]
Metric = Literal["attempts", "destinations", "blocked_attempts", "failed_handshakes"]
Action = Literal["flag", "throttle", "block"]
Port25Mode = Literal["block", "limit", "allow", "redirect"]
Mode = Literal["enforce", "audit"]

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an address or CIDR")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an address or CIDR with host bits clear "
                         f"({exc})") from None


def _host(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


HostAddress = Annotated[ipaddress.IPv4Address | ipaddress.IPv6Address, BeforeValidator(_host),
                        PlainSerializer(str, return_type=str)]

Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network),
                    PlainSerializer(str, return_type=str)]


def _mac(value: object) -> str:
    if not isinstance(value, str) or not _MAC.match(value.lower().replace("-", ":")):
        raise ValueError(f"{value!r} is not a MAC address like 52:54:00:12:34:56")
    return value.lower().replace("-", ":")


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{value!r}: names are lower-case letters, digits, _ and -")
    return value


Name = Annotated[str, AfterValidator(_name)]
MacAddress = Annotated[str, BeforeValidator(_mac)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
