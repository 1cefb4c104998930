"""The policy schema, version 1. Strict: unknown keys, wrong types and
impossible or overlapping values are errors. policies/default.yaml documents
every field."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

# Threshold and VmClass are re-exported: respond/responder.py and tests take them here.
from smtpguard.policy.classes import Member
from smtpguard.policy.classes import Threshold as Threshold
from smtpguard.policy.classes import VmClass as VmClass
from smtpguard.policy.fields import AT, Duration, Mode, Name, Network, Port, Strict


class InterfacePattern(Strict):
    """A VM-facing interface name pattern: a glob whose {vm} part names the VM.
    attachment: how its devices are plugged in, where the agent's detection
    (a Linux bridge port, Open vSwitch, a macvtap, else routed) does not
    know the switch: `ovs` hooks the device's own ingress, as for OVS."""

    pattern: str = Field(min_length=1, max_length=64)
    attachment: Literal["auto", "bridge", "routed", "ovs", "macvtap"] = "auto"

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
    InterfacePattern(pattern="macvtap*"),  # libvirt <interface type='direct'>
    InterfacePattern(pattern="tap{vm}"),  # OpenStack: tap<port-id prefix>
    InterfacePattern(pattern="fc-{vm}"),  # Firecracker
    InterfacePattern(pattern="veth*"),  # containers, the lab
)


class Interfaces(Strict):
    patterns: tuple[InterfacePattern, ...] = Field(default=DEFAULT_PATTERNS, min_length=1)
    vm_from_ifalias: bool = True

    @field_validator("patterns")
    @classmethod
    def _distinct(cls, v: tuple[InterfacePattern, ...]) -> tuple[InterfacePattern, ...]:
        seen = [p.pattern for p in v]
        for i, p in enumerate(seen):
            if p in seen[:i]:
                raise ValueError(f"{AT}{i}.pattern: {p!r} is listed twice")
        return v


class Datapath(Strict):
    no_answer_after: Duration = 2.0
    # datapath/trip.py: the skb->mark bit the classifier sets on the SYNs of a
    # VM past a block threshold, which the tables reject. 0: no trip wire.
    trip_mark: int = 0x04000000

    @field_validator("trip_mark")
    @classmethod
    def _one_bit(cls, v: int) -> int:
        if v < 0 or v >= 1 << 32 or v & (v - 1):
            raise ValueError("must be 0 or a single bit of the 32-bit mark, "
                             "e.g. 0x04000000")
        return v


class Libvirt(Strict):
    """Name VMs by their libvirt domain (UUID, name, <metadata>)."""

    enabled: bool | Literal["auto"] = "auto"  # auto: when python3-libvirt is there
    uri: str = Field(default="qemu:///system", min_length=1)


class Proxmox(Strict):
    """Name VMs by their Proxmox VMID, from /etc/pve's configs."""

    enabled: bool | Literal["auto"] = "auto"  # auto: when the root exists
    root: str = Field(default="/etc/pve", min_length=1)
    tenant_prefix: str = Field(default="tenant-", min_length=1)
    class_prefix: str = Field(default="smtpguard-", min_length=1)


class Ovs(Strict):
    """Name VMs by their Open vSwitch port (external_ids set by Nova, libvirt)."""

    enabled: bool | Literal["auto"] = "auto"  # auto: when OVS is installed or its socket is there
    db: str = Field(default="unix:/run/openvswitch/db.sock", min_length=1)

    @field_validator("db")
    @classmethod
    def _address(cls, v: str) -> str:
        if not re.fullmatch(r"unix:/.+|tcp:(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):\d{1,5}", v):
            raise ValueError(f"{v!r}: an OVSDB address is unix:/PATH or tcp:HOST:PORT")
        return v


class Inventory(Strict):
    """Where VM identities come from besides the interface patterns."""

    libvirt: Libvirt = Libvirt()
    proxmox: Proxmox = Proxmox()
    ovs: Ovs = Ovs()


class Webhook(Strict):
    url: str
    events: tuple[Literal["flagged", "throttled", "blocked", "released"], ...] = (
        "flagged", "throttled", "blocked", "released")
    timeout: Duration = 5.0
    queue: int = Field(default=1000, ge=1, le=100_000)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v


class Incidents(Strict):
    """Evidence kept for the abuse desk."""

    retention: Duration = 90 * 86400.0
    top_destinations: int = Field(default=10, ge=1, le=1000)


class Metrics(Strict):
    """What /metrics exports per VM: only VMs with an SMTP attempt within
    active_within (and VMs not in state ok); per-host totals always."""

    active_within: Duration = 3600.0

    @field_validator("active_within")
    @classmethod
    def _window(cls, v: float) -> float:
        if not 60.0 <= v <= 30 * 86400.0:
            raise ValueError("must be between 1m and 30d")
        return v


class Enforcement(Strict):
    """Which firewall backend enforces (read at start; `run --backend` wins)."""

    backend: Literal["auto", "nftables", "iptables"] = "auto"


class TenantBudget(Strict):
    """New SMTP connections a tenant's VMs may open together, on every host
    of the fleet, in a window; past it, each of its VMs is throttled (or
    flagged) wherever it runs."""

    name: Name = "budget"
    window: Duration = 3600.0
    at_most: int = Field(ge=1)
    action: Literal["throttle", "flag"] = "throttle"
    duration: Duration = 3600.0
    share_every: Duration = 5.0  # how often a host looks at its counts (fleet/tenants.py)


class FleetTls(Strict):
    """Client TLS for etcd: the CA that signed its certificate, and ours."""

    ca: str
    cert: str | None = None
    key: str | None = None


class Fleet(Strict):
    """Shared state in etcd: each VM's enforcement record under its id, so a
    VM that moves to another host keeps its block, and a release on one host
    is a release everywhere. Absent: every agent is on its own."""

    endpoints: tuple[str, ...] = Field(min_length=1)
    prefix: str = "/smtpguard"
    host: str | None = None  # this host's name in the fleet (default: its hostname)
    tls: FleetTls | None = None
    record_ttl: Duration = 86400.0  # a dead host's records go this long after it
    host_ttl: Duration = 30.0  # its presence key: seconds without a keepalive
    timeout: Duration = 2.0  # one etcd request
    tenant_budget: TenantBudget | None = None  # every tenant's, counted over all hosts
    # The policy from etcd too: every key under it is a policy document, added
    # after the local files (as files of a directory are), watched.
    policy_prefix: str | None = None

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for url in v:
            if not re.match(r"^https?://[^\s/:]+(:\d+)?/?$", url):
                raise ValueError(f"{url!r} is not an http(s)://host:port etcd endpoint")
        return v

    @field_validator("prefix", "policy_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/") or v.endswith("/") or "//" in v:
            raise ValueError(f"{v!r}: a key prefix starts with / and does not end with one")
        return v


def _default_classes() -> dict[str, VmClass]:
    return {"default": VmClass()}


class Policy(Strict):
    version: Literal[1] = 1
    mode: Mode = "enforce"
    smtp_ports: tuple[Port, ...] = (25, 465, 587, 2525)
    relays: tuple[Network, ...] = ()
    interfaces: Interfaces = Interfaces()
    inventory: Inventory = Inventory()
    datapath: Datapath = Datapath()
    classes: dict[Name, VmClass] = Field(default_factory=_default_classes, min_length=1)
    default_class: Name = "default"
    members: tuple[Member, ...] = ()
    webhook: Webhook | None = None
    enforcement: Enforcement = Enforcement()
    incidents: Incidents = Incidents()
    metrics: Metrics = Metrics()
    fleet: Fleet | None = None

    def mode_of(self, cls: str) -> Mode:
        """A class's mode: its own, else the policy's."""
        c = self.classes.get(cls)
        return (c.mode if c is not None else None) or self.mode

    @field_validator("smtp_ports")
    @classmethod
    def _ports(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("at least one SMTP port is needed")
        if len(set(v)) != len(v):
            raise ValueError("ports are listed more than once")
        return v

    @field_validator("relays")
    @classmethod
    def _no_overlap(cls, v: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
                    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        for i, a in enumerate(v):
            for j, b in enumerate(v[:i]):
                if a.version == b.version and a.overlaps(b):
                    raise ValueError(f"{AT}{i}: {a} overlaps relays.{j} ({b})")
        return v

    @model_validator(mode="after")
    def _references(self) -> Policy:
        if self.default_class not in self.classes:
            raise ValueError(f"{AT}default_class: no class {self.default_class!r} "
                             f"(have {', '.join(sorted(self.classes))})")
        for i, m in enumerate(self.members):
            if m.cls not in self.classes:
                raise ValueError(f"{AT}members.{i}.class: no class {m.cls!r}")
        for name, c in self.classes.items():
            for j, p in enumerate(c.limited_ports):
                if p not in self.smtp_ports:
                    raise ValueError(f"{AT}classes.{name}.limited_ports.{j}: {p} is not in "
                                     "smtp_ports")
        return self
