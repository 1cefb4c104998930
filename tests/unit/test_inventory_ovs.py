"""OVSDB as an identity source, without ovsdb-server (tests/integration has the
real one): the wire, external_ids -> Identity, the rows, a fake server.

The messages below are what ovsdb-server 3.1 (Debian 12) sent OvsSource's
monitor request, with ovs-vsctl adding a Nova-style port, then a vhost-user
port, then deleting the first (captured 2026-12-07, reformatted as literals)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from smtpguard.inventory import ovs
from smtpguard.inventory.identity import SOURCES, Identity, Uncovered
from smtpguard.inventory.resolve import Resolver
from smtpguard.inventory.sources import from_policy
from smtpguard.policy import Policy
from smtpguard.policy.load import load_text
from smtpguard.policy.model import Inventory, Ovs

VM = "8f1e0c3a-6b2d-4c1e-9a7b-2d5e6f708192"
PORT = "5c3e1d2a-0b4f-4e6a-8d7c-9f1e2a3b4c5d"
TAP1, BR_INT, VHU1 = ("63ae9229-2b26-4a4f-92d2-389a272da591",
                      "a9547c91-bb3a-4601-bf96-b2cf9fa4c22c",
                      "ee736e4b-9f84-4cb3-95c2-8faee722827a")
P_BR, P_TAP1, P_VHU1 = ("65f9483e-32c0-4c48-afd0-5646b0f8a6c4",
                        "b8470e7e-c5f7-431b-a2bc-5a8be49ac66c",
                        "e30a101c-7849-4b27-a126-ef0e41f3d693")
BRIDGE = "e9c34dd5-09b7-4bbb-8d21-776b31707f7c"


def ext(**kv: str) -> list[Any]:
    return ["map", [[k.replace("_", "-"), v] for k, v in sorted(kv.items())]]


NOVA = dict(attached_mac="FA:16:3E:12:34:56", iface_id=PORT, iface_status="active",
            vm_uuid=VM.upper())
REPLY = {"id": "monitor", "error": None, "result": {
    "Interface": {
        TAP1: {"new": {"name": "tap1", "external_ids": ext(**NOVA), "type": ""}},
        BR_INT: {"new": {"name": "br-int", "external_ids": ext(), "type": "internal"}}},
    "Port": {
        P_BR: {"new": {"name": "br-int", "interfaces": ["uuid", BR_INT]}},
        P_TAP1: {"new": {"name": "tap1", "interfaces": ["uuid", TAP1]}}},
    "Bridge": {BRIDGE: {"new": {"name": "br-int", "ports": [
        "set", [["uuid", P_BR], ["uuid", P_TAP1]]]}}}}}
ADD_VHU = {"id": None, "method": "update", "params": [None, {
    "Interface": {
        TAP1: {"new": {"name": "tap1", "external_ids": ext(**{**NOVA, "iface_status": "down"}),
                       "type": ""},
               "old": {"external_ids": ext(**NOVA)}},
        VHU1: {"new": {"name": "vhu1", "external_ids": ext(vm_uuid=VM.upper()),
                       "type": "dpdkvhostuserclient"}}},
    "Port": {P_VHU1: {"new": {"name": "vhu1", "interfaces": ["uuid", VHU1]}}},
    "Bridge": {BRIDGE: {"new": {"name": "br-int", "ports": [
        "set", [["uuid", P_BR], ["uuid", P_TAP1], ["uuid", P_VHU1]]]},
        "old": {"ports": ["set", [["uuid", P_BR], ["uuid", P_TAP1]]]}}}}]}
DEL_TAP1 = {"id": None, "method": "update", "params": [None, {
    "Interface": {TAP1: {"old": {"name": "tap1", "external_ids": ext(**NOVA), "type": ""}}},
    "Port": {P_TAP1: {"old": {"name": "tap1", "interfaces": ["uuid", TAP1]}}},
    "Bridge": {BRIDGE: {"new": {"name": "br-int", "ports": [
        "set", [["uuid", P_BR], ["uuid", P_VHU1]]]}}}}]}


def wire(*msgs: dict[str, Any]) -> bytes:
    """As ovsdb-server writes them: compact, back to back, no separator."""
    return b"".join(json.dumps(m, separators=(",", ":"), ensure_ascii=False).encode()
                    for m in msgs)


# -- the wire ---------------------------------------------------------------

def test_messages_split_however_the_stream_is_cut() -> None:
    """Back-to-back JSON texts come out whole and in order whether they arrive
    at once or a byte at a time (strings with brackets, quotes and escapes
    included, and UTF-8 cut inside a character)."""
    tricky = {"id": 1, "result": ["a]}{[\"\\", "\\\\", "\u00e9{"], "error": None}
    data = wire(REPLY, tricky, ADD_VHU) + b"\n " + wire(DEL_TAP1)
    assert ovs.JsonStream().feed(data) == [REPLY, tricky, ADD_VHU, DEL_TAP1]
    stream, got = ovs.JsonStream(), []
    for i in range(len(data)):
        got += stream.feed(data[i:i + 1])
    assert got == [REPLY, tricky, ADD_VHU, DEL_TAP1]


@pytest.mark.parametrize("bad", [b"42 {}", b"}", b"{\"a\": tru}"])
def test_what_is_not_json_rpc_raises(bad: bytes) -> None:
    with pytest.raises(ovs.OvsdbError):
        ovs.JsonStream().feed(bad)


def test_datum_decoding() -> None:
    assert ovs.decode_map(ext(vm_id="x", iface_id="y")) == {"vm-id": "x", "iface-id": "y"}
    assert ovs.decode_map(["map", []]) == {} == ovs.decode_map("nope")
    assert ovs.decode_uuids(["uuid", "u1"]) == {"u1"}
    assert ovs.decode_uuids(["set", [["uuid", "u1"], ["uuid", "u2"]]]) == {"u1", "u2"}
    assert ovs.decode_uuids(["set", []]) == set() == ovs.decode_uuids(None)


# -- external_ids -> Identity -------------------------------------------------

def test_nova_port_is_its_instance() -> None:
    """vm-uuid names the VM by its (lowercased) UUID, the id libvirt gives the
    same domain; iface-id and the guest MAC are facts for `members`."""
    got = ovs.identity(ovs.decode_map(ext(**NOVA)), bridge="br-int")
    assert got == Identity(id=VM, name=VM, source="ovs", uuid=VM, facts={
        "uuid": VM, "iface-id": PORT, "mac": "fa:16:3e:12:34:56", "ovs_bridge": "br-int"})


def test_libvirt_virtualport_is_its_domain() -> None:
    """libvirt's <virtualport type='openvswitch'> writes vm-id."""
    got = ovs.identity({"vm-id": VM, "iface-id": PORT, "attached-mac": "52:54:00:00:00:01"})
    assert got is not None and (got.id, got.uuid, got.facts["mac"]) == (
        VM, VM, "52:54:00:00:00:01")
    assert "ovs_bridge" not in got.facts


def test_a_port_without_an_instance_is_named_by_its_iface_id() -> None:
    """An OVN/Neutron port with only iface-id: id ovs:<iface-id>, no uuid."""
    got = ovs.identity({"iface-id": PORT})
    assert got is not None and (got.id, got.uuid, got.source) == (f"ovs:{PORT}", None, "ovs")
    assert ovs.identity({"iface-id": PORT, "vm-uuid": "not-a-uuid"}) == got


@pytest.mark.parametrize("ids", [{}, {"iface-status": "active"}, {"iface-id": "has space"},
                                 {"vm-uuid": "garbage", "attached-mac": "52:54:00:00:00:01"}])
def test_without_an_id_the_patterns_decide(ids: dict[str, str]) -> None:
    assert ovs.identity(ids) is None


def test_a_malformed_mac_is_no_fact() -> None:
    got = ovs.identity({"vm-uuid": VM, "attached-mac": "52:54:00"})
    assert got is not None and "mac" not in got.facts


# -- the rows -------------------------------------------------------------------

def test_rows_follow_the_monitor() -> None:
    """The initial reply names tap1 (with its bridge); an update that adds a
    vhost-user port reports it uncovered and names no interface for it; a
    delete forgets tap1; the bridge's own internal port names nothing."""
    rows = ovs.Rows()
    rows.apply(REPLY["result"], initial=True)
    assert set(rows.identities()) == {"tap1"}
    assert rows.identities()["tap1"].facts["ovs_bridge"] == "br-int"
    assert rows.uncovered() == []
    rows.apply(ADD_VHU["params"][1])
    assert set(rows.identities()) == {"tap1"}
    assert rows.uncovered() == [Uncovered(VM, VM, "vhost-user", "ovs", detail="vhu1")]
    rows.apply(DEL_TAP1["params"][1])
    assert rows.identities() == {}
    assert len(rows.uncovered()) == 1
    rows.apply(REPLY["result"], initial=True)  # a reconnect's reply replaces all
    assert set(rows.identities()) == {"tap1"} and rows.uncovered() == []


def test_hybrid_plug_names_the_tap_from_its_qvo() -> None:
    """Nova's hybrid plug: OVS holds qvoX, the VM's tapX is on a Linux bridge
    and gets qvoX's identity; a real row called tapX would win."""
    rows = ovs.Rows()
    rows.apply({"Interface": {"r1": {"new": {"name": "qvo5c3e1d2a-0b", "type": "",
                                             "external_ids": ext(**NOVA)}}}}, initial=True)
    got = rows.identities()
    assert set(got) == {"qvo5c3e1d2a-0b", "tap5c3e1d2a-0b"}
    assert got["tap5c3e1d2a-0b"].id == VM
    assert got["tap5c3e1d2a-0b"].facts["ovs_interface"] == "qvo5c3e1d2a-0b"
    rows.apply({"Interface": {"r2": {"new": {"name": "tap5c3e1d2a-0b", "type": "",
                                             "external_ids": ext(iface_id="other")}}}})
    assert rows.identities()["tap5c3e1d2a-0b"].id == "ovs:other"


@pytest.mark.parametrize(("db", "want"), [
    ("unix:/run/openvswitch/db.sock", (socket.AF_UNIX, "/run/openvswitch/db.sock")),
    ("tcp:127.0.0.1:6640", (socket.AF_INET, ("127.0.0.1", 6640))),
    ("tcp:[::1]:6640", (socket.AF_INET6, ("::1", 6640))),
])
def test_addresses(db: str, want: tuple[Any, Any]) -> None:
    assert ovs.address(db) == want


@pytest.mark.parametrize("db", ["ssl:1.2.3.4:6640", "unix:", "tcp:host", "/run/db.sock"])
def test_bad_addresses(db: str) -> None:
    with pytest.raises(ValueError):
        ovs.address(db)
    with pytest.raises(ValueError):
        Ovs(db=db)


# -- the policy ------------------------------------------------------------------

def test_policy_section_is_strict_and_defaults_to_auto() -> None:
    """inventory.ovs: enabled true|false|auto (auto by default), db an
    address; unknown keys are errors; "ovs" ranks between Proxmox and patterns."""
    assert Policy().inventory.ovs == Ovs(enabled="auto", db="unix:/run/openvswitch/db.sock")
    pol = load_text("version: 1\ninventory:\n  ovs:\n    enabled: true\n"
                    "    db: tcp:[::1]:6640\n")
    assert pol.inventory.ovs == Ovs(enabled=True, db="tcp:[::1]:6640")
    with pytest.raises(Exception, match="sock"):
        load_text("version: 1\ninventory:\n  ovs:\n    sock: /x\n")
    assert SOURCES.index("proxmox") < SOURCES.index("ovs") < SOURCES.index("pattern")


def test_sources_take_ovs_as_the_policy_says(tmp_path: Path) -> None:
    """enabled: false never, true always; auto when the socket is there."""
    off = dict(libvirt={"enabled": False}, proxmox={"enabled": False})
    sock = tmp_path / "db.sock"
    assert from_policy(Inventory(**off, ovs={"enabled": False})) == []
    got = from_policy(Inventory(**off, ovs={"enabled": True, "db": f"unix:{sock}"}))
    assert [(s.name, getattr(s, "db", None)) for s in got] == [("ovs", f"unix:{sock}")]
    sock.touch()
    got = from_policy(Inventory(**off, ovs={"enabled": "auto", "db": f"unix:{sock}"}))
    assert [s.name for s in got] == ["ovs"]


# -- the source against a fake ovsdb-server ------------------------------------

class FakeServer:
    """Accepts on a Unix socket, answers `monitor` with `reply`, then sends
    what push() is given; answers echo; can drop its clients."""

    def __init__(self, path: Path, reply: dict[str, Any]) -> None:
        self.path, self.reply = path, reply
        self.requests: list[dict[str, Any]] = []
        self.answer_echo = True
        self.clients: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        stream = ovs.JsonStream()
        try:
            while data := conn.recv(65536):
                for msg in stream.feed(data):
                    self.requests.append(msg)
                    if msg.get("method") == "monitor":
                        conn.sendall(wire({**self.reply, "id": msg["id"]}))
                    elif msg.get("method") == "echo" and self.answer_echo:
                        conn.sendall(wire({"id": msg["id"], "result": msg["params"],
                                           "error": None}))
        except OSError:
            return  # the client left, or drop()

    def push(self, msg: dict[str, Any]) -> None:
        for c in self.clients:
            c.sendall(wire(msg))

    def drop(self) -> None:
        for c in self.clients:
            c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.clients = []

    def close(self) -> None:
        self.drop()
        self.listener.close()
        self.path.unlink(missing_ok=True)


def until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeServer]:
    srv = FakeServer(tmp_path / "db.sock", REPLY)
    yield srv
    srv.close()


@pytest.fixture
def source(tmp_path: Path) -> Iterator[ovs.OvsSource]:
    src = ovs.OvsSource(f"unix:{tmp_path / 'db.sock'}", retry_initial=0.01, retry_max=0.05)
    yield src
    src.stop()


def test_source_names_ports_and_follows_updates(server: FakeServer,
                                                source: ovs.OvsSource) -> None:
    """settled once the monitor's reply is read; updates change the cache
    and call on_change; a MAC that contradicts attached-mac is a miss."""
    changes = Changes()
    source.start(changes)
    assert source.settled.wait(5)
    assert source.available() and changes.count == 1
    got = source.lookup("tap1")
    assert got is not None and got.id == VM
    assert source.lookup("tap1", "FE:16:3E:12:34:56") == got  # libvirt's tap MAC
    assert source.lookup("tap1", "fa:16:3e:12:34:56") == got
    assert source.lookup("tap1", "fe:16:3e:99:99:99") is None
    assert source.lookup("br-int") is None
    server.push(ADD_VHU)
    until(lambda: source.uncovered() != [])
    until(lambda: changes.count == 2)  # on_change follows the cache's swap
    server.push(DEL_TAP1)
    until(lambda: source.lookup("tap1") is None)
    until(lambda: changes.count == 3)
    req = server.requests[0]
    assert req["method"] == "monitor" and req["params"][0] == "Open_vSwitch"
    assert set(req["params"][2]) == {"Interface", "Port", "Bridge"}


def test_source_reconnects_and_replaces_its_cache(server: FakeServer,
                                                  source: ovs.OvsSource) -> None:
    """A dropped connection keeps the cache; the next reply replaces it whole."""
    source.start(lambda: None)
    until(source.available)
    server.reply = {"id": None, "error": None, "result": {"Interface": {
        "x": {"new": {"name": "tap2", "type": "", "external_ids": ext(iface_id="p2")}}}}}
    with capture_logs() as logs:
        server.drop()
        until(lambda: source.lookup("tap2") is not None)
    assert source.lookup("tap1") is None and source.available()
    events = [e["event"] for e in logs if e["log_level"] != "debug"]
    assert events == ["inventory.ovs_disconnected", "inventory.ovs_connected"]


def test_absent_server_then_it_appears(tmp_path: Path, source: ovs.OvsSource) -> None:
    """No socket: settled at once (start is not held up), unavailable, one
    warning; the server appears later and the source connects."""
    with capture_logs() as logs:
        source.start(lambda: None)
        assert source.settled.wait(1)
        time.sleep(0.2)  # several retries
        assert not source.available() and source.lookup("tap1") is None
        srv = FakeServer(tmp_path / "db.sock", REPLY)
        try:
            until(source.available)
        finally:
            source.stop()
            srv.close()
    events = [e["event"] for e in logs if e["log_level"] != "debug"]
    assert events[:2] == ["inventory.ovs_unavailable", "inventory.ovs_connected"]


def test_a_silent_server_is_probed(server: FakeServer, tmp_path: Path) -> None:
    """After `probe` seconds of silence the source sends an echo and stays
    connected when it is answered."""
    src = ovs.OvsSource(f"unix:{tmp_path / 'db.sock'}", probe=0.1)
    try:
        src.start(lambda: None)
        until(src.available)
        until(lambda: any(r.get("method") == "echo" for r in server.requests))
        time.sleep(0.4)
        assert src.available() and len(server.clients) == 1
    finally:
        src.stop()


def test_a_server_that_stops_answering_is_left(server: FakeServer, tmp_path: Path) -> None:
    """A connection on which even echo goes unanswered (a hung server, a
    lost TCP peer) is dropped and made again."""
    server.answer_echo = False
    src = ovs.OvsSource(f"unix:{tmp_path / 'db.sock'}", probe=0.05, retry_initial=0.01)
    try:
        src.start(lambda: None)
        until(src.available)
        until(lambda: sum(r.get("method") == "monitor" for r in server.requests) >= 2)
    finally:
        src.stop()


def test_stop_ends_the_thread(server: FakeServer, source: ovs.OvsSource) -> None:
    source.start(lambda: None)
    until(source.available)
    source.stop()
    assert not any(t.name == "ovs-source" for t in threading.enumerate())


# -- the resolver ------------------------------------------------------------------

class Reports:
    def __init__(self, name: str, found: list[Uncovered] | Exception) -> None:
        self.name, self.found = name, found

    def start(self, on_change: Callable[[], None]) -> None: ...
    def stop(self) -> None: ...
    def available(self) -> bool:
        return True

    def lookup(self, ifname: str, mac: str | None = None) -> Identity | None:
        return None

    def uncovered(self) -> list[Uncovered]:
        if isinstance(self.found, Exception):
            raise self.found
        return self.found


class Silent(Reports):
    """A source without uncovered()."""

    uncovered = None  # type: ignore[assignment]


def test_resolver_gathers_uncovered_vms() -> None:
    """Every source's uncovered VMs, sorted by vm; the same VM and reason from
    a weaker source (OVS after libvirt) is not repeated; a source that raises
    is logged and skipped; one without the method reports none."""
    lv = [Uncovered("b-uuid", "web2", "vhost-user", "libvirt", detail="/run/vhu0"),
          Uncovered("a-uuid", "web1", "hostdev", "libvirt", detail="0000:03:10.2")]
    ov = [Uncovered("b-uuid", "b-uuid", "vhost-user", "ovs", detail="vhu0"),
          Uncovered("c-uuid", "c-uuid", "vhost-user", "ovs", detail="vhu1")]
    r = Resolver([Reports("libvirt", lv), Silent("proxmox", []),
                  Reports("broken", RuntimeError("boom")), Reports("ovs", ov)])
    with capture_logs() as logs:
        got = r.uncovered()
    assert [(u.vm, u.source) for u in got] == [
        ("a-uuid", "libvirt"), ("b-uuid", "libvirt"), ("c-uuid", "ovs")]
    assert [(e["event"], e["source"]) for e in logs] == [("inventory.uncovered_failed",
                                                          "broken")]
    assert Resolver().uncovered() == []
