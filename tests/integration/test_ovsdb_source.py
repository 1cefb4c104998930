"""OvsSource against a real ovsdb-server (Debian's openvswitch-switch), with
ports added by the real ovs-vsctl. No ovs-vswitchd and no kernel datapath are
needed (`--no-wait`): the source reads only the database, as it does on a
hypervisor. Every file (database, socket, logs) is in a temporary directory
with a unique prefix; the server is killed even when a test fails.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from conftest import unique
from smtpguard.inventory.identity import Uncovered
from smtpguard.inventory.ovs import OvsSource

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
TOOLS = ("ovsdb-server", "ovsdb-tool", "ovs-vsctl")


def require_ovs() -> None:
    """A missing binary fails under CI=true (scripts/setup.sh --test installs
    openvswitch-switch) and skips elsewhere."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not SCHEMA.exists():
        missing.append(str(SCHEMA))
    if not missing:
        return
    # make test installs it (scripts/setup.sh --test): missing is a failure, never a skip.
    pytest.fail(f"needs Open vSwitch ({', '.join(missing)} missing: apt install "
                "openvswitch-switch, as make test does)")


class Ovsdb:
    """One ovsdb-server of our own, a child process on a private socket."""

    def __init__(self) -> None:
        # Not pytest's tmp_path: a Unix socket path must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix=f"{unique('sgodb')}-"))
        self.db = self.dir / "conf.db"
        self.sock = self.dir / "db.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(["ovsdb-tool", "create", str(self.db), str(SCHEMA)], check=True,
                       capture_output=True)

    @property
    def address(self) -> str:
        return f"unix:{self.sock}"

    def start(self) -> None:
        log = open(self.dir / "ovsdb-server.log", "ab")  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(
            ["ovsdb-server", str(self.db), f"--remote=punix:{self.sock}",
             f"--unixctl={self.dir / 'ovsdb-server.ctl'}",
             f"--pidfile={self.dir / 'ovsdb-server.pid'}"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        until(self.sock.exists, what=f"ovsdb-server's socket {self.sock}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def vsctl(self, *args: str) -> None:
        subprocess.run(["ovs-vsctl", f"--db={self.address}", "--no-wait", "--timeout=10",
                        *args], check=True, capture_output=True, timeout=20)


def until(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout}s")
        time.sleep(0.005)


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def ovsdb() -> Iterator[Ovsdb]:
    require_ovs()
    server = Ovsdb()
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def source(ovsdb: Ovsdb) -> Iterator[OvsSource]:
    src = OvsSource(ovsdb.address, retry_initial=0.05, retry_max=0.5)
    try:
        yield src
    finally:
        src.stop()


def test_a_port_is_named_by_its_vm_and_follows_changes(ovsdb: Ovsdb,
                                                       source: OvsSource) -> None:
    """A port Nova plugs (vm-uuid, iface-id, attached-mac) is named by the VM's
    UUID well under a second after ovs-vsctl returns; changing its
    external_ids calls on_change and moves it to the new VM."""
    vm, port = str(uuid.uuid4()), str(uuid.uuid4())
    ovsdb.vsctl("add-br", "sgbr0")
    changes = Changes()
    source.start(changes)
    assert source.settled.wait(5)
    assert source.available() and changes.count == 1
    ovsdb.vsctl("add-port", "sgbr0", "sgtap1", "--", "set", "Interface", "sgtap1",
                f"external_ids:vm-uuid={vm.upper()}", f"external_ids:iface-id={port}",
                "external_ids:attached-mac=FA:16:3E:00:00:01")
    added = time.monotonic()
    until(lambda: source.lookup("sgtap1") is not None, timeout=0.5, what="sgtap1 named")
    assert time.monotonic() - added < 0.5
    got = source.lookup("sgtap1")
    assert got is not None and (got.id, got.name, got.uuid, got.source) == (vm, vm, vm, "ovs")
    assert dict(got.facts) == {"uuid": vm, "iface-id": port, "mac": "fa:16:3e:00:00:01",
                               "ovs_bridge": "sgbr0"}
    until(lambda: changes.count == 2, what="on_change")  # it follows the cache's swap
    other = str(uuid.uuid4())
    ovsdb.vsctl("set", "Interface", "sgtap1", f"external_ids:vm-uuid={other}")
    until(lambda: (g := source.lookup("sgtap1")) is not None and g.id == other,
          what="sgtap1 moved to the other VM")
    until(lambda: changes.count == 3, what="on_change")
    ovsdb.vsctl("del-port", "sgbr0", "sgtap1")
    until(lambda: source.lookup("sgtap1") is None, what="sgtap1 forgotten")


def test_ports_without_an_instance(ovsdb: Ovsdb, source: OvsSource) -> None:
    """Present before the source starts, and known once it is settled: a port
    with only iface-id is ovs:<iface-id>; one without external_ids, and the
    bridge's own internal port, are left to the patterns (None)."""
    port = str(uuid.uuid4())
    ovsdb.vsctl("add-br", "sgbr0", "--", "add-port", "sgbr0", "sgtap2", "--",
                "set", "Interface", "sgtap2", f"external_ids:iface-id={port}", "--",
                "add-port", "sgbr0", "sgtap3")
    source.start(lambda: None)
    assert source.settled.wait(5)
    got = source.lookup("sgtap2")
    assert got is not None and (got.id, got.uuid) == (f"ovs:{port}", None)
    assert source.lookup("sgtap3") is None
    assert source.lookup("sgbr0") is None


def test_a_vhost_user_port_is_uncovered(ovsdb: Ovsdb, source: OvsSource) -> None:
    """A VM on a DPDK vhost-user port is reported uncovered, not named."""
    vm = str(uuid.uuid4())
    source.start(lambda: None)
    assert source.settled.wait(5)
    ovsdb.vsctl("add-br", "sgbr0", "--", "add-port", "sgbr0", "vhusg0", "--",
                "set", "Interface", "vhusg0", "type=dpdkvhostuserclient",
                f"external_ids:vm-uuid={vm}")
    until(lambda: source.uncovered() != [], what="vhost-user port reported")
    assert source.uncovered() == [Uncovered(vm, vm, "vhost-user", "ovs", detail="vhusg0")]
    assert source.lookup("vhusg0") is None


def test_the_source_reconnects_after_a_restart(ovsdb: Ovsdb, source: OvsSource) -> None:
    """Killed, ovsdb-server makes the source unavailable (its names kept); back,
    the source reconnects by itself and follows changes made after."""
    vm = str(uuid.uuid4())
    ovsdb.vsctl("add-br", "sgbr0", "--", "add-port", "sgbr0", "sgtap4", "--",
                "set", "Interface", "sgtap4", f"external_ids:vm-id={vm}")
    changes = Changes()
    source.start(changes)
    until(source.available, what="connected")
    with capture_logs() as logs:
        ovsdb.kill()
        until(lambda: not source.available(), what="disconnect noticed")
        time.sleep(0.3)  # retries against the dead socket: not logged again
    said = [e["event"] for e in logs if e["log_level"] != "debug"]
    assert said == ["inventory.ovs_disconnected"]
    got = source.lookup("sgtap4")
    assert got is not None and got.id == vm
    ovsdb.sock.unlink(missing_ok=True)  # SIGKILL leaves the socket file behind
    before = changes.count
    ovsdb.start()
    until(source.available, timeout=10, what="reconnected")
    until(lambda: changes.count > before, what="on_change")
    port = str(uuid.uuid4())
    ovsdb.vsctl("add-port", "sgbr0", "sgtap5", "--", "set", "Interface", "sgtap5",
                f"external_ids:iface-id={port}")
    until(lambda: source.lookup("sgtap5") is not None, what="sgtap5 named after restart")
    got = source.lookup("sgtap4")
    assert got is not None and got.id == vm
