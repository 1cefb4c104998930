"""Proxmox VE guests, read from their config files under /etc/pve.

Host interfaces are named after the VMID (pve-common PVE/Network.pm): `tap<vmid>i<n>` is
a QEMU VM's netN, `veth<vmid>i<n>` a container's; the iptables firewall's `fwbr`, `fwln`,
`fwpr` devices are plumbing, not the guest. `qemu-server/<vmid>.conf`, `lxc/<vmid>.conf`
(pmxcfs links into `nodes/<this node>/`) hold `key: value` lines, the description as `#`
lines, then sections (snapshots, `[PENDING]`, `[pve:pending]`, `[special:...]`) that are
not the current config. A VMID has one config in the cluster (pmxcfs enforces it), so a
tap whose config is still on another node (a live migration moves it only after the
guest runs here) is that guest. Tags (`a;b`, split on `;`, `,` and blanks as PVE does)
give tenant and class: the first with the prefix wins, in file order (alphabetical
unless the datacenter's tag-style keeps config order). pmxcfs has whole-second mtimes,
so a file modified within _RACY_NS of being read is read again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import select
import threading
import time
from collections.abc import Callable
from itertools import chain
from pathlib import Path

from smtpguard import logs
from smtpguard.inventory.identity import Identity
from smtpguard.policy.watch import IN_CLOEXEC, IN_NONBLOCK, MASK

_IFACE = re.compile(r"^(tap|veth)([1-9]\d*)i(\d+)$")
_CONF = re.compile(r"^[1-9]\d*\.conf$")
_SECTION = re.compile(r"^\[[^\]]*\]\s*$")
_LINE = re.compile(r"^([a-z][a-z_\-]*\d*):\s*(\S.*?)\s*$")
_RAW_LXC = re.compile(r"^lxc\.[a-z0-9_\-.]+(:|\s*=)")  # raw LXC keys, valid, not ours
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_DIRS = {"qemu": "qemu-server", "lxc": "lxc"}
_RACY_NS = 2_000_000_000  # whole-second mtimes, plus clock skew between nodes
_SETTLE = 0.05  # after an inotify event, let a write-and-rename finish

_Sig = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino


class ProxmoxSource:
    """IdentitySource for a Proxmox VE host; `root` is where pmxcfs is mounted."""

    name = "proxmox"

    def __init__(self, root: Path = Path("/etc/pve"), *, tenant_prefix: str = "tenant-",
                 class_prefix: str = "smtpguard-", poll_interval: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.tenant_prefix = tenant_prefix
        self.class_prefix = class_prefix
        self.poll_interval = poll_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[_Sig, int, dict[str, str]]] = {}
        self._logged: set[tuple[Path, str]] = set()
        self._stop = threading.Event()
        self._wake = -1
        self._thread: threading.Thread | None = None

    def available(self) -> bool:
        return self.root.is_dir()

    def lookup(self, ifname: str, mac: str | None = None) -> Identity | None:
        """`mac` is unused: a tap's or veth's host side has its own MAC, not the guest's."""
        m = _IFACE.match(ifname)
        if m is None:
            return None
        kind = "qemu" if m[1] == "tap" else "lxc"
        vmid, net = m[2], f"net{m[3]}"
        sub, file = _DIRS[kind], f"{vmid}.conf"
        try:  # the local node's config, else (a migration in flight) another node's
            for path in chain([self.root / sub / file],
                              self.root.glob(f"nodes/*/{sub}/{file}")):
                conf = self._read(path)
                if conf is not None:
                    return self._identity(kind, vmid, net, conf, _node_of(path))
        except OSError as exc:  # e.g. pmxcfs gone: ENOTCONN
            logs.get(ifname=ifname).debug("proxmox.lookup_failed", error=str(exc))
        return None

    def _identity(self, kind: str, vmid: str, net: str, conf: dict[str, str],
                  node: str | None) -> Identity:
        qemu = kind == "qemu"
        name = conf.get("name" if qemu else "hostname") or f"{'vm' if qemu else 'ct'}{vmid}"
        tags = [t for t in re.split(r"[;,\s]+", conf.get("tags", "")) if t]
        facts = {"vmid": vmid, "kind": kind, "name": name}
        if node:
            facts["node"] = node
        nic = _options(conf.get(net, ""))
        if qemu:  # `model=MAC` comes first (the default key), or `macaddr=`
            mac = nic.get("macaddr") or next(iter(nic.values()), "")
        else:
            mac = nic.get("hwaddr", "")
        if _MAC.match(mac.lower()):
            facts["mac"] = mac.lower()
        uuid = _options(conf.get("smbios1", "")).get("uuid") if qemu else None
        return Identity(id=f"pve:{vmid}", name=name, source="proxmox",
                        tenant=_tagged(tags, self.tenant_prefix),
                        cls=_tagged(tags, self.class_prefix),
                        uuid=uuid.lower() if uuid else None, facts=facts)

    def _read(self, path: Path) -> dict[str, str] | None:
        """The file's current section, from cache while (mtime, size, inode) stand."""
        try:
            st = path.stat()
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            now = int(self._clock() * 1e9)
            with self._lock:
                hit = self._cache.get(path)
            if hit is not None and hit[0] == sig and hit[1] - sig[0] >= _RACY_NS:
                return hit[2]
            text = path.read_bytes().decode(errors="replace")
        except OSError as exc:
            with self._lock:
                self._cache.pop(path, None)
            if not isinstance(exc, FileNotFoundError | NotADirectoryError):
                logs.get(path=str(path)).debug("proxmox.config_unreadable", error=str(exc))
            return None
        conf = self._parse(path, text)
        with self._lock:
            self._cache[path] = (sig, now, conf)
        return conf

    def _parse(self, path: Path, text: str) -> dict[str, str]:
        conf: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue  # blank, or the description
            if _SECTION.match(line):
                break  # snapshots and pending changes follow the current config
            if (m := _LINE.match(line)) is not None:
                conf[m[1]] = m[2]
            elif not _RAW_LXC.match(line):
                self._skipped(path, lineno, line)
        return conf

    def _skipped(self, path: Path, lineno: int, line: str) -> None:
        with self._lock:
            if (path, line) in self._logged:
                return
            if len(self._logged) > 4096:
                self._logged.clear()
            self._logged.add((path, line))
        logs.get(path=str(path)).debug("proxmox.config_line_skipped", line=lineno,
                                       text=line[:200])

    # Watching. inotify wakes us at once for writes made on this node; pmxcfs raises
    # no inotify event for changes replicated from other nodes, so a poll also runs.

    def start(self, on_change: Callable[[], None]) -> None:
        if self._thread is not None:
            return
        dirs = [self.root / sub for sub in _DIRS.values()]
        fd = _inotify(dirs)
        wake_r, self._wake = os.pipe()
        self._stop = threading.Event()  # its own: a thread stop() gave up on still ends
        self._thread = threading.Thread(  # baseline now: every change after start() counts
            target=self._watch, args=(on_change, dirs, fd, wake_r, self._scan(dirs), self._stop),
            name="proxmox-watch", daemon=True)
        self._thread.start()
        logs.get().info("inventory.watching", source=self.name, root=str(self.root),
                        inotify=fd >= 0, poll_interval=self.poll_interval)

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):  # the thread may be gone already
            os.write(self._wake, b"x")
        self._thread.join(5)
        os.close(self._wake)
        self._thread, self._wake = None, -1

    def _watch(self, on_change: Callable[[], None], dirs: list[Path], fd: int, wake: int,
               baseline: tuple[frozenset[tuple[str, _Sig]], bool], stop: threading.Event,
               ) -> None:
        last, racy = baseline  # racy: a file was modified just before the scan
        try:
            while not stop.is_set():
                ready, _, _ = select.select([wake] + ([fd] if fd >= 0 else []), [], [],
                                            self.poll_interval)
                if fd in ready:
                    stop.wait(_SETTLE)
                    with contextlib.suppress(BlockingIOError):
                        while os.read(fd, 65536):
                            pass
                if stop.is_set():
                    break
                current, racy_now = self._scan(dirs)
                # A racy file may have changed again within its mtime: report once settled.
                if current != last or (racy and not racy_now):
                    try:
                        on_change()
                    except Exception:
                        logs.get().debug("proxmox.on_change_failed", exc_info=True)
                last, racy = current, racy_now
        finally:
            for f in (fd, wake):
                if f >= 0:
                    os.close(f)

    def _scan(self, dirs: list[Path]) -> tuple[frozenset[tuple[str, _Sig]], bool]:
        seen: set[tuple[str, _Sig]] = set()
        now = int(self._clock() * 1e9)
        racy = False
        for d in dirs:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue  # absent (no containers yet, pmxcfs down): the poll sees it come
            for e in (e for e in entries if _CONF.match(e.name)):  # not tmp files, locks
                with contextlib.suppress(OSError):  # gone since the listing: not seen
                    st = e.stat()
                    seen.add((e.path, (st.st_mtime_ns, st.st_size, st.st_ino)))
                    racy |= now - st.st_mtime_ns < _RACY_NS
        return frozenset(seen), racy


def _options(value: str) -> dict[str, str]:
    """A property string `a=1,b=2` (a bare item is the format's default key)."""
    items = (item.partition("=") for item in value.split(",") if item)
    return {k.strip(): v.strip() for k, _, v in items}


def _tagged(tags: list[str], prefix: str) -> str | None:
    """The first tag starting with `prefix` (PVE compares tags case-insensitively)."""
    for tag in tags:
        if len(tag) > len(prefix) and tag[: len(prefix)].lower() == prefix.lower():
            return tag[len(prefix):]
    return None


def _node_of(path: Path) -> str | None:
    """`nodes/<node>/<kind>/<vmid>.conf` -> node, also through pmxcfs' links."""
    up = path.resolve().parents
    return up[1].name if len(up) > 2 and up[2].name == "nodes" else None


def _inotify(dirs: list[Path]) -> int:
    """An inotify fd watching `dirs` (those that exist), or -1 without inotify."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
    except (OSError, AttributeError):
        return -1
    for d in dirs if fd >= 0 else []:
        libc.inotify_add_watch(fd, str(d).encode(), MASK)  # a missing dir: polled
    return fd
