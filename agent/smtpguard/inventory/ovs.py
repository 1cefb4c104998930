"""Identity from Open vSwitch's database: which VM each OVS port belongs to.

Whoever plugs a VM into OVS writes who it is into the port's Interface row,
`external_ids`: OpenStack Nova (os-vif) sets `vm-uuid` (the instance), `iface-id`
(the Neutron port), `attached-mac` and `iface-status`; libvirt, for an
`<interface>` with `<virtualport type='openvswitch'>`, sets `vm-id` (the domain
UUID), `iface-id` and `attached-mac`. So an interface with a VM UUID is that VM
(the same id libvirt's source gives it); one with only an `iface-id` (an
OVN/Neutron port without an instance) is `ovs:<iface-id>`; one with neither is
left to the policy's patterns. Nova's hybrid plug (the iptables firewall
driver) puts the VM's `tapX` on a Linux bridge and OVS sees only its `qvoX`
veth: `tapX` is named from `qvoX`'s row. A `dpdkvhostuser(client)` interface
is a VM whose packets only ovs-vswitchd (DPDK) touches: uncovered().

OvsSource speaks OVSDB's JSON-RPC (RFC 7047) on ovsdb-server's socket itself:
one `monitor` request returns the Interface, Port and Bridge rows, then the
server pushes every change, so a port is named within milliseconds of being
added, and the reply marks the end of the initial read exactly (settled). No
OVS binary is needed on the host (OVS may run in a container that shares only
its socket). lookup() reads the cache the worker thread keeps; the worker
reconnects with backoff when ovsdb-server is absent or restarts, keeping the
cache meanwhile (nothing plugs a port into OVS while its database is down),
and the first reply after a reconnect replaces it whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import logs
from . import domxml
from .identity import Identity, Uncovered
from .ovsdb import JsonStream, OvsdbError, decode_map, decode_uuids

SOURCE = "ovs"
DEFAULT_DB = "unix:/run/openvswitch/db.sock"
DATABASE = "Open_vSwitch"
# What the monitor asks for: little, and nothing that changes with traffic.
COLUMNS = {"Interface": ["name", "type", "external_ids"],
           "Port": ["name", "interfaces"],
           "Bridge": ["name", "ports"]}
VHOST_USER = ("dpdkvhostuser", "dpdkvhostuserclient")

_IFACE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HYBRID = "qvo"  # Nova's hybrid plug: qvoX on OVS, tapX on the Linux bridge qbrX


# -- pure parts: the rows, the identities -----------------------------------


def identity(ext: Mapping[str, str], bridge: str | None = None) -> Identity | None:
    """The VM an Interface row's external_ids name, if any."""
    vm = _uuid(ext.get("vm-uuid")) or _uuid(ext.get("vm-id"))
    iface = (ext.get("iface-id") or "").strip()
    iface = iface if _IFACE_ID.match(iface) else ""
    mac = (ext.get("attached-mac") or "").strip().lower()
    facts: dict[str, str] = {}
    if vm:
        facts["uuid"] = vm
    if iface:
        facts["iface-id"] = iface
    if _MAC.match(mac):
        facts["mac"] = mac
    if bridge:
        facts["ovs_bridge"] = bridge
    if vm:
        return Identity(id=vm, name=vm, source=SOURCE, uuid=vm, facts=facts)
    if iface:
        return Identity(id=f"ovs:{iface}", name=f"ovs:{iface}", source=SOURCE, facts=facts)
    return None


def _uuid(value: str | None) -> str | None:
    try:
        return str(uuidlib.UUID(value.strip())) if value else None
    except ValueError:
        return None


@dataclass
class Rows:
    """The monitored tables as ovsdb-server last said: table -> row UUID -> columns."""

    tables: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def apply(self, updates: Mapping[str, Any], initial: bool = False) -> None:
        """A monitor reply (initial: replaces everything) or an update's
        <table-updates>: per row, "new" is the row's monitored columns, no
        "new" means it was deleted."""
        if initial:
            self.tables = {}
        if not isinstance(updates, Mapping):
            raise OvsdbError(f"table-updates is a {type(updates).__name__}")
        for table, rows in updates.items():
            have = self.tables.setdefault(table, {})
            for row, change in rows.items():
                new = change.get("new")
                if new is None:
                    have.pop(row, None)
                else:
                    have[row] = {**have.get(row, {}), **new}

    def interfaces(self) -> Iterator[tuple[str, str, dict[str, str], str | None]]:
        """(name, type, external_ids, bridge) of every Interface row."""
        bridges, ports = self.tables.get("Bridge", {}), self.tables.get("Port", {})
        bridge_of_port = {p: str(b.get("name", "")) for b in bridges.values()
                          for p in decode_uuids(b.get("ports"))}
        bridge_of_if = {i: bridge_of_port.get(p) for p, port in ports.items()
                        for i in decode_uuids(port.get("interfaces"))}
        for row, cols in self.tables.get("Interface", {}).items():
            name = cols.get("name")
            if isinstance(name, str) and name:
                yield (name, str(cols.get("type") or ""), decode_map(cols.get("external_ids")),
                       bridge_of_if.get(row))

    def identities(self) -> dict[str, Identity]:
        """Host interface name -> VM, for every interface whose row names one
        (a hybrid plug's tapX too, from its qvoX)."""
        out: dict[str, Identity] = {}
        aliases: dict[str, Identity] = {}
        for name, kind, ext, bridge in self.interfaces():
            ident = identity(ext, bridge)
            if ident is None or kind in VHOST_USER:
                continue
            out[name] = ident
            if name.startswith(_HYBRID) and len(name) > len(_HYBRID):
                aliases["tap" + name[len(_HYBRID):]] = Identity(
                    ident.id, ident.name, SOURCE, uuid=ident.uuid,
                    facts={**ident.facts, "ovs_interface": name})
        return {**aliases, **out}  # a real row of that name wins

    def uncovered(self) -> list[Uncovered]:
        """VMs on vhost-user ports: only ovs-vswitchd's DPDK datapath sees them."""
        found = []
        for name, kind, ext, _bridge in self.interfaces():
            ident = identity(ext)
            if kind in VHOST_USER and ident is not None:
                found.append(Uncovered(vm=ident.id, name=ident.name, reason="vhost-user",
                                       source=SOURCE, detail=name))
        return sorted(found, key=lambda u: (u.vm, u.detail))


def address(db: str) -> tuple[socket.AddressFamily, Any]:
    """A socket family and address for `unix:PATH` or `tcp:HOST:PORT`."""
    kind, _, rest = db.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host and port.isdigit():
            return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    raise ValueError(f"{db!r}: an OVSDB address is unix:PATH or tcp:HOST:PORT")


def present(db: str) -> bool:
    """Whether this host runs OVS: its socket is there, or ovsdb-server is
    installed (it may start after us). A tcp: address is taken as meant."""
    family, where = address(db)
    if family != socket.AF_UNIX:
        return True
    return (os.path.exists(where) or shutil.which("ovsdb-server") is not None
            or os.path.exists("/usr/sbin/ovsdb-server"))


# -- the source ---------------------------------------------------------------

class OvsSource:
    """IdentitySource for ports in Open vSwitch's database."""

    name = SOURCE

    def __init__(self, db: str = DEFAULT_DB, *, retry_initial: float = 0.1,
                 retry_max: float = 5.0, probe: float = 5.0, timeout: float = 5.0) -> None:
        self.db = db
        self._address = address(db)
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._probe = probe  # silence after which we ask the server for an echo
        self._timeout = timeout  # for connecting and for the monitor's reply
        self._log = logs.get(source=SOURCE, db=db)
        self._lock = threading.Lock()
        self._by_if: dict[str, Identity] = {}
        self._uncovered: list[Uncovered] = []
        self._connected = False
        self._on_change: Callable[[], None] = lambda: None
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        # Set once the first connection attempt is over (the monitor's reply
        # read, or no server): Resolver.wait_settled waits on it.
        self.settled = threading.Event()

    # -- IdentitySource ---------------------------------------------------

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._stopping.clear()
        self._worker = threading.Thread(target=self._run, name="ovs-source", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        if self._worker is None:
            return
        self._stopping.set()
        self._worker.join(timeout=10)
        self._worker = None

    def available(self) -> bool:
        return self._connected

    def lookup(self, ifname: str, mac: str | None = None) -> Identity | None:
        """A MAC that is neither the row's attached-mac nor its fe: tap MAC
        (libvirt's) is a miss: the name may just have been handed out again."""
        with self._lock:
            found = self._by_if.get(ifname)
        if found is None or mac is None:
            return found
        guest = found.facts.get("mac")
        return found if guest is None or mac.lower() in (guest, domxml.tap_mac(guest)) else None

    def uncovered(self) -> list[Uncovered]:
        with self._lock:
            return list(self._uncovered)

    def snapshot(self) -> dict[str, Identity]:
        """Every interface the source knows now (for status and tests)."""
        with self._lock:
            return dict(self._by_if)

    # -- the worker -------------------------------------------------------

    def _run(self) -> None:
        delay = self._retry_initial
        said_unavailable = False
        while not self._stopping.is_set():
            try:
                sock = self._connect()
                try:
                    reason = self._session(sock)
                finally:
                    sock.close()
            except (OSError, OvsdbError) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug here must not end the watching
                self._log.exception("inventory.ovs_failed")
                reason = str(exc)
            self.settled.set()
            if self._stopping.is_set():
                break
            if self._connected:  # it worked: say so once, come back at once
                self._connected = False
                said_unavailable = True
                delay = self._retry_initial
                self._log.warning("inventory.ovs_disconnected", reason=reason)
            elif not said_unavailable:
                said_unavailable = True
                self._log.warning("inventory.ovs_unavailable", reason=reason, retry_in=delay)
            else:
                self._log.debug("inventory.ovs_retry", reason=reason)
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self._retry_max)
        self._connected = False

    def _connect(self) -> socket.socket:
        family, where = self._address
        if family == socket.AF_UNIX and not os.path.exists(where):
            # A stat, not a connect, while ovsdb-server is not there.
            raise FileNotFoundError(f"no OVSDB socket at {where}")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._timeout)
            sock.connect(where)
        except OSError:
            sock.close()
            raise
        return sock

    def _session(self, sock: socket.socket) -> str:
        """Monitor until the connection ends or stop(); returns why it ended."""
        monitor = {"method": "monitor", "id": "monitor",
                   "params": [DATABASE, None, {t: {"columns": c} for t, c in COLUMNS.items()}]}
        sock.sendall(json.dumps(monitor).encode())
        sock.settimeout(0.25)  # how soon stop() is seen
        stream, rows = JsonStream(), Rows()
        last_rx = asked = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                silent = now - last_rx
                if not self._connected and silent > self._timeout:
                    raise OvsdbError(f"no reply to monitor in {self._timeout:.0f}s") from None
                if silent > 3 * self._probe:
                    return f"no answer in {silent:.0f}s"
                if silent > self._probe and now - asked > self._probe:
                    asked = now
                    sock.sendall(json.dumps({"method": "echo", "params": [],
                                             "id": "echo"}).encode())
                continue
            if not data:
                return "ovsdb-server closed the connection"
            last_rx = now
            for msg in stream.feed(data):
                self._message(sock, msg, rows)
        return "stopped"

    def _message(self, sock: socket.socket, msg: Any, rows: Rows) -> None:
        if not isinstance(msg, dict):
            raise OvsdbError(f"not a JSON-RPC message: {str(msg)[:80]}")
        method = msg.get("method")
        if method == "echo":  # the server's inactivity probe
            sock.sendall(json.dumps({"id": msg.get("id"), "result": msg.get("params"),
                                     "error": None}).encode())
        elif method == "update":
            params = msg.get("params")
            if not isinstance(params, list) or len(params) != 2:
                raise OvsdbError("update without <table-updates>")
            rows.apply(params[1])
            self._publish(rows)
        elif method is None and msg.get("id") == "monitor":
            if msg.get("error") is not None:
                raise OvsdbError(f"monitor refused: {msg['error']}")
            rows.apply(msg.get("result") or {}, initial=True)
            self._connected = True
            self._publish(rows, connected=True)
            self.settled.set()

    def _publish(self, rows: Rows, connected: bool = False) -> None:
        """Swap the cache; on_change when a mapping changed (and on connect)."""
        by_if, uncovered = rows.identities(), rows.uncovered()
        with self._lock:
            changed = (by_if, uncovered) != (self._by_if, self._uncovered)
            self._by_if, self._uncovered = by_if, uncovered
        if connected:
            self._log.info("inventory.ovs_connected", interfaces=len(by_if),
                           uncovered=len(uncovered))
        if changed or connected:
            try:
                self._on_change()
            except Exception:  # the agent's problem, not a reason to stop watching
                self._log.exception("inventory.on_change_failed")
