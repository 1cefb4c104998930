"""Proxmox VE identities from config files in Proxmox's on-disk format.

fixtures/pve/ mirrors /etc/pve on node pve1 of a two-node cluster: qemu-server, lxc
and local are links into nodes/pve1/, and nodes/pve2/ holds the other node's guests.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from smtpguard import logs
from smtpguard.inventory import proxmox
from smtpguard.inventory.identity import Identity, IdentitySource
from smtpguard.inventory.proxmox import ProxmoxSource

FIXTURES = Path(__file__).parent / "fixtures" / "pve"
WAIT = 5.0  # bound on every wait for the watcher; it normally answers in milliseconds
OLD = 1_700_000_000 * 10**9  # a settled mtime (ns), long before any test's clock


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A writable copy of the fixtures with settled mtimes (a fresh checkout's are new)."""
    dst = tmp_path / "pve"
    shutil.copytree(FIXTURES, dst, symlinks=True)
    for conf_file in dst.glob("nodes/*/*/*.conf"):
        os.utime(conf_file, ns=(OLD, OLD))
    return dst


def write(path: Path, text: str, mtime_ns: int | None = None) -> None:
    """As PVE does (PVE::File::file_set_contents): a temporary file renamed over."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    tmp.replace(path)


def conf(**keys: str) -> str:
    return "".join(f"{k}: {v}\n" for k, v in keys.items())


def test_satisfies_the_identity_source_protocol() -> None:
    """The agent can hold a ProxmoxSource wherever it takes an IdentitySource."""
    src: IdentitySource = ProxmoxSource(FIXTURES)
    assert src.name == "proxmox"


def test_qemu_tap_maps_to_its_vm() -> None:
    """tap<vmid>i<n> is VM <vmid>'s netN: id pve:<vmid>, name, tags, MAC, SMBIOS UUID."""
    assert ProxmoxSource(FIXTURES).lookup("tap100i0") == Identity(
        id="pve:100", name="web1", source="proxmox", tenant="acme", cls="trusted",
        uuid="b3247ab1-1fe6-428e-965b-08a1b64a8746",
        facts={"vmid": "100", "kind": "qemu", "name": "web1", "node": "pve1",
               "mac": "bc:24:11:2c:69:ec"})


def test_lxc_veth_maps_to_its_container() -> None:
    """veth<ctid>i<n> is container <ctid>'s netN, named by its hostname."""
    assert ProxmoxSource(FIXTURES).lookup("veth200i0") == Identity(
        id="pve:200", name="mail1", source="proxmox", tenant="globex", cls="relay",
        facts={"vmid": "200", "kind": "lxc", "name": "mail1", "node": "pve1",
               "mac": "bc:24:11:5e:7a:01"})


@pytest.mark.parametrize("ifname", ["fwbr100i0", "fwpr100p0", "fwln100i0", "fwln100o0",
                                    "fwbr200i0", "fwpr200p0", "fwln200i0"])
def test_firewall_plumbing_is_not_the_guest(ifname: str) -> None:
    """Only tap/veth face the guest; the firewall's bridge and veth pair get no identity."""
    assert ProxmoxSource(FIXTURES).lookup(ifname) is None


@pytest.mark.parametrize("ifname", ["vnet0", "tap0", "tap100", "tapabc", "veth0", "eth0",
                                    "veth100i0x", "tap0100i0", "vmbr0"])
def test_foreign_interface_names_are_not_proxmox_guests(ifname: str) -> None:
    """Names not of Proxmox's tap<vmid>i<n> / veth<vmid>i<n> shape are left to others."""
    assert ProxmoxSource(FIXTURES).lookup(ifname) is None


def test_snapshot_pending_and_special_sections_are_not_the_current_config() -> None:
    """name, tags and NICs come from the current config, never from [PENDING], a
    snapshot or [special:cloudinit] (QEMU) or [pve:pending] (LXC)."""
    src = ProxmoxSource(FIXTURES)
    vm, ct = src.lookup("tap100i0"), src.lookup("veth200i0")
    assert vm is not None and ct is not None
    assert (vm.name, vm.tenant, vm.cls) == ("web1", "acme", "trusted")
    assert (ct.name, ct.tenant, ct.cls) == ("mail1", "globex", "relay")
    pending_only = src.lookup("tap100i2")  # net2 is only in [PENDING] and a snapshot
    assert pending_only is not None and "mac" not in pending_only.facts


def test_mac_fact_is_the_looked_up_nics() -> None:
    """facts["mac"] is netN's MAC (lower case) for the interface of netN, not another
    NIC's; a NIC without a fixed MAC gives none."""
    src = ProxmoxSource(FIXTURES)
    macs = {i: (src.lookup(i) or Identity("", "", "")).facts.get("mac")
            for i in ("tap100i0", "tap100i1", "veth200i1", "tap101i0")}
    assert macs == {"tap100i0": "bc:24:11:2c:69:ec", "tap100i1": "bc:24:11:79:d5:65",
                    "veth200i1": "bc:24:11:5e:7a:02", "tap101i0": None}


def test_name_falls_back_to_vm_or_ct_and_vmid() -> None:
    """A guest without name/hostname is still named, after its kind and VMID."""
    src = ProxmoxSource(FIXTURES)
    vm, ct = src.lookup("tap101i0"), src.lookup("veth201i0")
    assert vm is not None and (vm.id, vm.name, vm.tenant, vm.cls) == ("pve:101", "vm101",
                                                                      None, None)
    assert ct is not None and (ct.id, ct.name, ct.facts["kind"]) == ("pve:201", "ct201", "lxc")


def test_guest_whose_config_is_on_another_node_keeps_its_vmid() -> None:
    """During a live migration the guest runs here before its config moves: the VMID is
    cluster-unique, so another node's config names it and says where it lives."""
    vm = ProxmoxSource(FIXTURES).lookup("tap300i0")
    assert vm is not None and (vm.id, vm.name, vm.tenant) == ("pve:300", "db3", "hooli")
    assert vm.facts["node"] == "pve2"


def test_kind_follows_the_interface_not_a_config_of_the_other_kind() -> None:
    """A veth never takes a QEMU VM's config (nor a tap a container's)."""
    src = ProxmoxSource(FIXTURES)
    assert src.lookup("veth100i0") is None and src.lookup("tap200i0") is None


@pytest.mark.parametrize(("tags", "tenant", "cls"), [
    ("tenant-acme;smtpguard-trusted", "acme", "trusted"),
    ("tenant-acme,smtpguard-trusted", "acme", "trusted"),
    ("tenant-acme smtpguard-trusted", "acme", "trusted"),
    ("prod; tenant-b ,tenant-a", "b", None),  # several: the first in the file wins
    ("Tenant-Acme", "Acme", None),            # PVE compares tags case-insensitively
    ("tenant-;smtpguard-", None, None),       # a bare prefix names nothing
    ("tenants-x;xsmtpguard-y", None, None),
])
def test_tags_give_tenant_and_class(root: Path, tags: str, tenant: str | None,
                                    cls: str | None) -> None:
    """Tags split on ; , and blanks like PVE's split_list; prefix stripped; first wins."""
    write(root / "qemu-server" / "150.conf", conf(name="t", tags=tags))
    vm = ProxmoxSource(root).lookup("tap150i0")
    assert vm is not None and (vm.tenant, vm.cls) == (tenant, cls)


def test_prefixes_are_configurable(root: Path) -> None:
    """Sites that tag differently say so in the constructor."""
    write(root / "qemu-server" / "150.conf", conf(tags="cust_acme;sg_bulk;tenant-x"))
    vm = ProxmoxSource(root, tenant_prefix="cust_", class_prefix="sg_").lookup("tap150i0")
    assert vm is not None and (vm.tenant, vm.cls) == ("acme", "bulk")


def test_changed_file_is_read_again(root: Path) -> None:
    """A new mtime is a new config, even edited in place with the same size and inode;
    so is a new size, or a new inode (PVE's write-and-rename)."""
    path = root / "qemu-server" / "150.conf"
    write(path, conf(name="aaaa", tags="tenant-x"), OLD)
    src = ProxmoxSource(root)
    assert (vm := src.lookup("tap150i0")) is not None and vm.name == "aaaa"
    path.write_text(conf(name="bbbb", tags="tenant-y"))
    os.utime(path, ns=(OLD + 10**9, OLD + 10**9))
    assert (vm := src.lookup("tap150i0")) is not None and (vm.name, vm.tenant) == ("bbbb",
                                                                                   "y")
    write(path, conf(name="cccccc"), OLD + 10**9)
    assert (vm := src.lookup("tap150i0")) is not None and vm.name == "cccccc"


def test_unchanged_file_is_served_from_cache(root: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated lookups of a settled, unchanged file do not read it again."""
    path = root / "qemu-server" / "150.conf"
    write(path, conf(name="web"), OLD)
    src = ProxmoxSource(root)
    assert src.lookup("tap150i0") is not None
    reads: list[Path] = []
    real = Path.read_bytes

    def counted(p: Path) -> bytes:
        reads.append(p)
        return real(p)

    monkeypatch.setattr(Path, "read_bytes", counted)
    for _ in range(3):
        assert (vm := src.lookup("tap150i0")) is not None and vm.name == "web"
    assert reads == []


def test_file_modified_just_before_it_was_read_is_read_again(root: Path) -> None:
    """pmxcfs keeps whole-second mtimes: an edit in the same second with the same size
    leaves (mtime, size) alone, so a read that close to the mtime is not trusted."""
    path = root / "qemu-server" / "150.conf"
    now = [OLD / 1e9 + 0.5]
    src = ProxmoxSource(root, clock=lambda: now[0])
    path.write_text(conf(name="aaaa"))
    os.utime(path, ns=(OLD, OLD))
    assert (vm := src.lookup("tap150i0")) is not None and vm.name == "aaaa"
    path.write_text(conf(name="bbbb"))  # in place: same inode, size and (kept) mtime
    os.utime(path, ns=(OLD, OLD))
    now[0] += 5
    assert (vm := src.lookup("tap150i0")) is not None and vm.name == "bbbb"


def test_removed_file_gives_none(root: Path) -> None:
    """A destroyed guest's interface no longer maps to it, cached or not."""
    src = ProxmoxSource(root)
    assert src.lookup("tap100i0") is not None
    (root / "qemu-server" / "100.conf").unlink()
    assert src.lookup("tap100i0") is None


def test_unreadable_root_gives_none(tmp_path: Path) -> None:
    """No /etc/pve (not a Proxmox host, pmxcfs down): unavailable, lookups answer None."""
    src = ProxmoxSource(tmp_path / "absent")
    assert not src.available() and src.lookup("tap100i0") is None
    assert ProxmoxSource(FIXTURES).available()


def test_malformed_lines_are_skipped_and_logged_once(root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad line costs only itself: the rest of the config is read, nothing raises,
    and each bad line is logged once at debug however often the file is read."""
    events: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def debug(self, event: str, **kw: Any) -> None:
            events.append((event, kw))

    monkeypatch.setattr(logs, "get", lambda **bind: Recorder())
    path = root / "qemu-server" / "150.conf"
    text = ("#desc\nname: web\nthis is not a config line\nName: Upper\nmemory:\n"
            "  indented: x\nlxc.raw.key = fine\ntags: tenant-acme\nnet0: virtio=zz,bridge=v\n")
    now = [0.0]
    src = ProxmoxSource(root, clock=lambda: now[0])  # every read looks racy: re-parsed
    write(path, text)
    for _ in range(3):
        vm = src.lookup("tap150i0")
        assert vm is not None and (vm.name, vm.tenant) == ("web", "acme")
        assert "mac" not in vm.facts
    skipped = sorted(kw["text"] for ev, kw in events if ev == "proxmox.config_line_skipped")
    assert skipped == ["  indented: x", "Name: Upper", "memory:", "this is not a config line"]


def test_binary_garbage_never_raises(root: Path) -> None:
    """Whatever is in the file, lookup answers an Identity or None."""
    (root / "qemu-server" / "150.conf").write_bytes(b"\xff\xfe\x00name: x\n[\n\x00\x00")
    assert ProxmoxSource(root).lookup("tap150i0") is not None


def _watch(src: ProxmoxSource) -> threading.Event:
    fired = threading.Event()
    src.start(fired.set)
    return fired


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "poll"])
def test_on_change_fires_when_a_config_is_written_or_removed(
        root: Path, monkeypatch: pytest.MonkeyPatch, inotify: bool) -> None:
    """Written (tmp + rename, as PVE writes) or removed configs call on_change: at once
    by inotify on this node, by the poll for changes replicated from other nodes."""
    if not inotify:
        monkeypatch.setattr(proxmox, "_inotify", lambda dirs: -1)
    # inotify alone must answer (the poll is far off); the poll alone must answer too.
    src = ProxmoxSource(root, poll_interval=60.0 if inotify else 0.05)
    fired = _watch(src)
    try:
        write(root / "lxc" / "250.conf", conf(hostname="new"), OLD)
        assert fired.wait(WAIT)
        fired.clear()
        write(root / "qemu-server" / "100.conf", conf(name="renamed"), OLD)
        assert fired.wait(WAIT)
        fired.clear()
        (root / "lxc" / "250.conf").unlink()
        assert fired.wait(WAIT)
    finally:
        src.stop()


def test_stop_ends_the_watch(root: Path) -> None:
    """stop() returns promptly, leaves no thread behind, and start() works again."""
    src = ProxmoxSource(root, poll_interval=60.0)
    _watch(src)
    src.stop()
    assert not [t for t in threading.enumerate() if t.name == "proxmox-watch"]
    fired = _watch(src)
    try:
        write(root / "qemu-server" / "150.conf", conf(name="x"), OLD)
        assert fired.wait(WAIT)
    finally:
        src.stop()


def test_failing_callback_does_not_end_the_watch(root: Path) -> None:
    """on_change raising is logged; later changes are still reported."""
    calls: list[int] = []
    first, fired = threading.Event(), threading.Event()

    def on_change() -> None:
        calls.append(1)
        if len(calls) == 1:
            first.set()
            raise RuntimeError("agent busy")
        fired.set()

    src = ProxmoxSource(root, poll_interval=60.0)
    src.start(on_change)
    try:
        write(root / "qemu-server" / "150.conf", conf(name="x"), OLD)
        assert first.wait(WAIT)
        write(root / "qemu-server" / "151.conf", conf(name="y"), OLD)
        assert fired.wait(WAIT)
    finally:
        src.stop()


def test_edit_within_its_mtime_second_is_reported_again_once_settled(root: Path) -> None:
    """pmxcfs' whole-second mtimes can hide a second edit from the scan: a change seen
    while fresh is reported once more when it has settled, and then no more."""
    now = [OLD / 1e9]
    calls: list[float] = []
    first, second = threading.Event(), threading.Event()

    def on_change() -> None:
        calls.append(now[0])
        (second if first.is_set() else first).set()

    src = ProxmoxSource(root, poll_interval=0.02, clock=lambda: now[0])
    src.start(on_change)
    try:
        write(root / "qemu-server" / "150.conf", conf(name="x"), OLD)  # fresh by the clock
        assert first.wait(WAIT)
        now[0] += 5  # settled
        assert second.wait(WAIT)
        threading.Event().wait(0.2)  # ten more polls
        assert len(calls) == 2
    finally:
        src.stop()
