"""The state store, the webhook queue and the control socket protocol."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from receiver import Receiver
from smtpguard.api.control import ControlServer, request
from smtpguard.detect.machine import Transition, VmRecord
from smtpguard.errors import SmtpguardError, StoreError
from smtpguard.observe.webhook import Webhook
from smtpguard.respond.store import Store


def tr(vm: str, new: str, at: float, actor: str = "auto") -> Transition:
    return Transition(vm, "ok", new, at, at + 10, "r", actor, "t", {"t": 1.0}, 1)


def test_store_round_trip_and_offence_history(tmp_path: Path) -> None:
    """Records and transitions survive reopening; only automatic blocks count
    for escalation."""
    s = Store(tmp_path / "state.db")
    rec = VmRecord("web1", "blocked", 100.0, 110.0, "fanout", "auto", None, None, 5.0)
    s.save(rec, [tr("web1", "blocked", 100.0)])
    s.save(rec, [tr("web1", "blocked", 200.0, actor="operator:alice")])
    s.save_samples(150.0, {"web1": (10, 2, 3)})
    s.close()
    s = Store(tmp_path / "state.db")
    assert s.records() == {"web1": rec}
    assert s.blocks_at("web1") == [100.0]
    assert [t.at for t in s.history("web1")] == [100.0, 200.0]
    assert s.samples() == {"web1": (150.0, (10, 2, 3))}


def test_store_errors_are_clear(tmp_path: Path) -> None:
    """A corrupted or unwritable database raises StoreError naming the file."""
    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="state.db"):
        Store(bad)
    good = Store(tmp_path / "ok.db")
    good.db.execute("PRAGMA query_only=ON")
    with pytest.raises(StoreError, match="ok.db"):
        good.save(VmRecord("a"), [])


def test_store_writes_are_transactional(tmp_path: Path) -> None:
    """A failure in the middle of a save leaves the previous state whole."""
    s = Store(tmp_path / "state.db")
    s.save(VmRecord("a", "flagged"), [tr("a", "flagged", 1.0)])
    broken = Transition("a", "ok", "blocked", 2.0, None, "r", "auto", None,
                        {"x": object()}, 1)  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        s.save(VmRecord("a", "blocked"), [broken])
    assert s.records()["a"].state == "flagged"
    assert len(s.history("a")) == 1
    assert isinstance(s.db, sqlite3.Connection)


def test_webhook_delivers_in_order_after_an_outage() -> None:
    """Events offered while the endpoint is down arrive afterwards, all of
    them, in order; offering never blocks."""
    r = Receiver()
    hook = Webhook(f"http://127.0.0.1:{r.port}/hook", timeout=1, max_backoff=0.4)
    for i in range(20):
        hook.offer({"event": "vm.blocked", "n": i})
    # Offering returned with nothing delivered (it would wait forever here if
    # it waited for delivery): all 20 queued while the endpoint is down.
    assert hook.pending() == 20 and r.got == []
    deadline = time.monotonic() + 10
    while hook.failures < 2 and time.monotonic() < deadline:  # an outage, retried
        time.sleep(0.05)
    assert hook.failures >= 2 and hook.pending() == 20 and r.got == []
    r.up()
    deadline = time.monotonic() + 10
    while len(r.got) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    hook.stop()
    r.down()
    assert [e["n"] for e in r.got] == list(range(20))
    assert hook.failures >= 1


def test_webhook_queue_is_bounded_and_filters_events() -> None:
    hook = Webhook("http://127.0.0.1:9/none", queue=3, events=("blocked",), max_backoff=5)
    for i in range(5):
        hook.offer({"event": "vm.blocked", "n": i})
    hook.offer({"event": "vm.flagged", "n": 99})
    assert hook.pending() == 3 and hook.dropped == 2
    hook.stop(drain=0)


@pytest.fixture
def server(tmp_path: Path) -> Any:
    path = tmp_path / "ctl" / "control.sock"
    seen: list[dict[str, Any]] = []

    def handle(req: dict[str, Any]) -> dict[str, Any]:
        seen.append(req)
        if req["cmd"] == "boom":
            raise SmtpguardError("no VM 'x' on this host")
        return {"ok": True, "echo": req["cmd"]}

    srv = ControlServer(path, handle)
    srv.start()
    yield path, seen
    srv.stop()


@pytest.mark.privileged  # the control socket serves root only
def test_control_socket_protocol(server: Any) -> None:
    """Root gets answers; errors come back as one line; the socket is 0600."""
    path, seen = server
    assert request(path, {"cmd": "status"}) == {"ok": True, "echo": "status"}
    with pytest.raises(SmtpguardError, match="no VM 'x' on this host"):
        request(path, {"cmd": "boom"})
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    for raw in (b"not json\n", b"[1, 2]\n", b'{"nocmd": 1}\n'):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(raw)
            reply = json.loads(s.makefile().readline())
        assert reply["ok"] is False and reply["error"].startswith("bad request")
    assert [r["cmd"] for r in seen] == ["status", "boom"]


@pytest.mark.privileged  # dropping to another user needs root
def test_control_socket_rejects_non_root_peers() -> None:
    """Even with the file opened up, a non-root peer is refused (SO_PEERCRED)."""
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="sgctl"))
    seen: list[dict[str, Any]] = []
    path = top / "control.sock"
    srv = ControlServer(path, lambda req: seen.append(req) or {"ok": True})  # type: ignore[func-returns-value]
    srv.start()
    os.chmod(top, 0o755)
    os.chmod(path, 0o666)
    code = ("import os, socket, sys; os.setgid(65534); os.setuid(65534); "
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(b'{\"cmd\": \"block\", \"vm\": \"x\"}\\n'); "
            "print(s.makefile().readline())")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                              text=True, timeout=10)
    finally:
        srv.stop()
        shutil.rmtree(top)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert json.loads(out) == {"ok": False, "error": "permission denied: root only"}
    assert seen == []


def test_renaming_a_vm_moves_its_whole_history(tmp_path: Path) -> None:
    """The migration from interface names to ids: record, transitions (so
    escalation counts the old offences), samples and incidents (with the name
    inside their data) move in one step; a key that has a record already is
    never overwritten."""
    s = Store(tmp_path / "state.db")
    rec = VmRecord("vnet3", "blocked", 100.0, 110.0, "fanout", "auto", None, None, 5.0)
    s.save(rec, [tr("vnet3", "blocked", 100.0)])
    s.save_samples(150.0, {"vnet3": (10, 2, 3)})
    ident = s.add_incident("vnet3", 100.0, {"vm": "vnet3", "state": "blocked"})
    assert s.rename_vm("vnet3", "uuid-1")
    assert set(s.records()) == {"uuid-1"} and s.blocks_at("uuid-1") == [100.0]
    assert s.samples() == {"uuid-1": (150.0, (10, 2, 3))}
    inc = s.incident(ident)
    assert inc is not None and inc["vm"] == "uuid-1"
    assert [i["vm"] for i in s.incidents("uuid-1")] == ["uuid-1"]
    s.save(VmRecord("vnet4", "ok", 1.0, None, "", "auto", None, None, 0.0), [])
    assert not s.rename_vm("vnet4", "uuid-1")  # uuid-1 has its own record
    assert set(s.records()) == {"uuid-1", "vnet4"}
    s.set_meta("vm_ids", "1")
    assert s.meta("vm_ids") == "1" and s.meta("nope") is None


def test_state_under_interface_names_moves_to_ids_once(tmp_path: Path) -> None:
    """The first start that knows ids moves an interface-named VM's record to
    the id of the VM on that interface now; later starts never move a name
    again (it could be another VM's by then)."""
    from smtpguard.inventory import migrate
    from smtpguard.inventory.vmiface import VmIface
    from smtpguard.policy import Policy

    s = Store(tmp_path / "state.db")
    s.save(VmRecord("vnet3", "blocked", 1.0, 9e9, "fanout", "auto", None, None, 0.0), [])
    s.save(VmRecord("vnet4", "blocked", 1.0, 9e9, "fanout", "auto", None, None, 0.0), [])
    naming = Policy().interfaces
    web = VmIface(3, "vnet3", "uuid-web", "vnet*", name="web", source="libvirt")
    assert migrate.to_ids(s, [web], naming) == 1
    assert set(s.records()) == {"uuid-web", "vnet4"}
    later = VmIface(4, "vnet4", "uuid-db", "vnet*", name="db", source="libvirt")
    assert migrate.to_ids(s, [later], naming) == 0  # once only
    assert set(s.records()) == {"uuid-web", "vnet4"}
