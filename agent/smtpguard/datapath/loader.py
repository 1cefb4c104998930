"""Load the classifier: pinned programs and maps, compiled only when needed.

A build is named by a tag (sources, flags, kernel). When programs of that tag
are pinned beside the maps, the agent just opens them: no compile, no LLVM.
Otherwise (a first start after boot) the build stored in the cache directory
is loaded with bpf(2) (prebuilt.py, progload.py), and only when there is
none or it does not load does a child process compile with bcc and pin them
(compile.py), storing the build for the next time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpguard import logs
from smtpguard.datapath import maps, prebuilt, progload, recent
from smtpguard.datapath.bpfsys import PinnedMap, map_info, obj_get
from smtpguard.datapath.build import (
    BPF_SOURCE,
    PROGRAMS,
    build_tag,
    cflags,
    pin_programs,
    prog_pin,
)
from smtpguard.datapath.doorbell import Doorbell
from smtpguard.errors import BpfLoadError

PINNED_MAPS: dict[str, tuple[type[Any], type[Any]]] = {
    **maps.MIRRORS, "smtp_ports": (ctypes.c_uint32, ctypes.c_uint8)}
# The compiled build kept for starts with nothing pinned, in the state dir.
CACHE_DIR = "bpf-cache"
# Ring buffers have no keys or values to mirror or check, and hold no
# per-VM data: the doorbell opens this one itself.
WAKE_RING = "smtp_wake_ring"


def default_bpf_dir() -> Path:
    """bpf/ of the checkout, the copy `make install` puts beside the venv
    (/opt/smtpguard/bpf), or the Debian package's (/usr/share/smtpguard/bpf)."""
    here = Path(__file__).resolve()
    installed = Path(sys.prefix).parent / "bpf"
    packaged = Path("/usr/share/smtpguard/bpf")
    for cand in (here.parents[3] / "bpf", here.parents[1] / "bpf", installed, packaged):
        if (cand / BPF_SOURCE).exists():
            return cand
    raise BpfLoadError(f"cannot find {BPF_SOURCE} near {here}")


@dataclass(frozen=True)
class Sizes:
    """Map sizes, fixed when the program loads (a change recreates the maps)."""

    max_stats: int = 32768
    max_ifaces: int = 4096
    conn_table: int = 262144
    recent: int = 65536

    def max_entries(self) -> dict[str, int]:
        return {"smtp_stats": self.max_stats, "smtp_conns": self.conn_table,
                "smtp_dests": self.max_ifaces, "smtp_recent": self.recent,
                "smtp_ports": 65536, "smtp_config": 1, "smtp_full": len(maps.FULL_SLOTS),
                "smtp_wake": 1, "smtp_trip": self.max_ifaces}


def ensure_bpffs(root: Path) -> None:
    """Mount bpffs at root unless it is one already."""
    root.mkdir(parents=True, exist_ok=True)
    if _fstype(root) == "bpf":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpfLoadError(f"mounting bpffs at {root}: {os.strerror(err)}")
    logs.get().info("bpffs.mounted", path=str(root))


def _fstype(path: Path) -> str | None:
    best, kind = "", None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def stale_pins(pin_dir: Path, sizes: Sizes) -> list[str]:
    """Pinned maps whose shape differs from what this build would create."""
    stale = []
    for name, n in sizes.max_entries().items():
        path = pin_dir / name
        if not path.exists():
            continue
        key, leaf = PINNED_MAPS[name]
        try:
            fd = obj_get(str(path))
        except OSError:
            stale.append(name)
            continue
        try:
            info = map_info(fd)
        finally:
            os.close(fd)
        if (info.key_size, info.value_size, info.max_entries) != (
                ctypes.sizeof(key), ctypes.sizeof(leaf), n):
            stale.append(name)
    return stale


class Datapath:
    """The loaded classifier: program fds for tc, and its maps."""

    def __init__(self, pin_dir: Path, sizes: Sizes | None = None,
                 bpf_dir: Path | None = None, cache_dir: Path | None = None) -> None:
        self.pin_dir = pin_dir
        self.sizes = sizes or Sizes()
        self.bpf_dir = bpf_dir or default_bpf_dir()
        # Where compiled builds are kept across reboots (the state dir's
        # bpf-cache/); None: always compile what is not pinned.
        self.cache_dir = cache_dir
        self.ingress_fd = -1
        self.egress_fd = -1
        self.compile_seconds = 0.0
        self.source = ""  # how the programs came: pinned, cache or compiled
        self.tables: dict[str, PinnedMap] = {}
        self._tag = ""
        self._adopted = False
        self._child: subprocess.Popen[str] | None = None
        self._started = 0.0

    @property
    def loaded(self) -> bool:
        return self.ingress_fd >= 0

    def prepare(self) -> None:
        """Drop pins of another shape and, when this build is not pinned yet,
        start compiling it in a child. Called early (the CLI does, before it
        imports the rest of the agent), the compile overlaps the agent's own
        start-up; load() waits for it."""
        if self._tag:
            return
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        stale = stale_pins(self.pin_dir, self.sizes)
        if stale:
            # What a map of another shape held cannot be carried over; the
            # others keep their counters (the new build opens them).
            for name in stale:
                with contextlib.suppress(FileNotFoundError):
                    (self.pin_dir / name).unlink()
            logs.get(pin_dir=str(self.pin_dir)).warning("datapath.maps_recreated",
                                                        changed=stale)
        self._adopted = all((self.pin_dir / n).exists() for n in PINNED_MAPS)
        flags = cflags(self.bpf_dir, self.pin_dir, self.sizes.max_stats,
                       self.sizes.max_ifaces, self.sizes.conn_table, self.sizes.recent)
        self._tag = build_tag(self.bpf_dir, flags)
        if self._adopted and all(prog_pin(self.pin_dir, p, self._tag).exists()
                                 for p in PROGRAMS):
            self.source = "pinned"
            return
        cache: list[str] = []
        if self.cache_dir is not None:
            key = prebuilt.cache_key(self.bpf_dir, flags)
            path = prebuilt.cache_path(self.cache_dir, key)
            if self._load_cached(path, key):
                self.source = "cache"
                return
            cache = ["--cache-file", str(path), "--cache-key", json.dumps(key)]
        self.source = "compiled"
        self._started = time.monotonic()
        self._child = subprocess.Popen(
            [sys.executable, "-m", "smtpguard.datapath.compile", "--bpf-dir",
             str(self.bpf_dir), "--pin-dir", str(self.pin_dir), "--tag", self._tag,
             *cache, "--", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _load_cached(self, path: Path, key: dict[str, str]) -> bool:
        """Load and pin the stored build; False (logged with the reason) when
        it is missing or unusable, and the caller compiles."""
        log = logs.get(pin_dir=str(self.pin_dir), cache=str(path))
        try:
            fds = progload.load(prebuilt.read(path, key), PROGRAMS, self.pin_dir)
        except prebuilt.CacheMiss as exc:
            log.info("bpf.cache_miss", reason=str(exc))
            return False
        try:
            pin_programs(self.pin_dir, fds, self._tag)
        except OSError as exc:
            log.warning("bpf.cache_miss", reason=f"pinning programs: {exc}")
            return False
        finally:
            for fd in fds.values():
                os.close(fd)
        return True

    def load(self) -> None:
        """Open (compiling first if needed) the programs and the pinned maps."""
        self.prepare()
        compiled = self._child is not None
        if self._child is not None:
            child, self._child = self._child, None
            try:
                self._finish(child)
            except BpfLoadError:
                self._tag = ""  # a later load() starts over
                raise
        try:
            self.ingress_fd, self.egress_fd = (
                obj_get(str(prog_pin(self.pin_dir, p, self._tag))) for p in PROGRAMS)
            self.tables = {name: PinnedMap(str(self.pin_dir / name), key, leaf)
                           for name, (key, leaf) in PINNED_MAPS.items()}
        except OSError as exc:
            self.close()
            raise BpfLoadError(f"opening pinned objects in {self.pin_dir}: {exc}") from exc
        logs.get(pin_dir=str(self.pin_dir)).info(
            "bpf.loaded", build=self._tag, compiled=compiled, adopted=self._adopted,
            source=self.source, compile_seconds=round(self.compile_seconds, 3))

    def _finish(self, child: subprocess.Popen[str]) -> None:
        out, err = child.communicate()
        self.compile_seconds = time.monotonic() - self._started
        if child.returncode == 0:
            for line in out.splitlines():  # the child's word on the cache
                with contextlib.suppress(ValueError, TypeError):
                    msg = dict(json.loads(line))
                    stored = msg.pop("cache", "") == "stored"
                    logs.get(pin_dir=str(self.pin_dir)).info(
                        "bpf.cache_stored" if stored else "bpf.cache_not_stored", **msg)
            return
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        if not Path(f"/lib/modules/{os.uname().release}/build").exists():
            raise BpfLoadError(
                f"compiling {BPF_SOURCE}: no kernel headers at "
                f"/lib/modules/{os.uname().release}/build (run: make setup)")
        if "No module named 'bcc'" in err:
            raise BpfLoadError("bcc is not importable (Debian's python3-bpfcc: make setup)")
        logs.get().debug("bpf.compile_output", stderr=err[-4000:])
        raise BpfLoadError(f"compiling {BPF_SOURCE}: {last}")

    def table(self, name: str) -> PinnedMap:
        return self.tables[name]

    def doorbell(self) -> Doorbell:
        """The word the classifier sets when counts change (see doorbell.py)."""
        return Doorbell(self.table("smtp_wake").fd, str(self.pin_dir / WAKE_RING))

    def set_ports(self, ports: Iterable[int]) -> None:
        """Mark exactly these ports as SMTP, in one batch update."""
        wanted = set(ports)
        keys = (ctypes.c_uint32 * 65536)(*range(65536))
        values = (ctypes.c_uint8 * 65536)(*(1 if p in wanted else 0 for p in range(65536)))
        self.table("smtp_ports").update_batch(keys, values)

    def set_no_answer(self, seconds: float) -> None:
        self._config(no_answer_ns=int(seconds * 1e9))

    def set_slot_offset(self, offset_ns: int) -> None:
        """Shift the sketch's slot clock (tests only: 0 in production). Readers
        then take their `now` from slot_now()."""
        self._config(slot_offset_ns=offset_ns % (1 << 64))

    def set_trip_mark(self, mark: int) -> None:
        """The skb->mark bits a tripped interface's SYNs get (0: no trip wire)."""
        self._config(trip_mark=mark)

    def slot_now(self) -> int:
        """CLOCK_MONOTONIC as the sketch's slots see it (with the offset)."""
        off = int(self.table("smtp_config")[ctypes.c_uint32(0)].slot_offset_ns)
        return (time.monotonic_ns() + off) % (1 << 64)

    def _config(self, **fields: int) -> None:
        table = self.table("smtp_config")
        cfg = table[ctypes.c_uint32(0)]
        for k, v in fields.items():
            setattr(cfg, k, v)
        table[ctypes.c_uint32(0)] = cfg

    def fill(self) -> dict[str, tuple[int, int, int]]:
        """map -> (entries, capacity, times the classifier found it full), for
        the hash maps that can fill up; the LRU maps evict instead."""
        sizes = self.sizes.max_entries()
        full = self.table("smtp_full")
        return {name: (sum(1 for _ in self.table(name).keys()), sizes[name],
                       int(full[ctypes.c_uint32(slot)].value))
                for name, slot in maps.FULL_SLOTS.items()}

    def forget(self, ifindexes: set[int]) -> int:
        """Delete every map entry of these interfaces; returns how many."""
        if not ifindexes:
            return 0
        removed = 0
        for name in ("smtp_stats", "smtp_conns"):
            table = self.table(name)
            doomed = [k for k, _ in table.items() if k.ifindex in ifindexes]
            for k in doomed:
                with contextlib.suppress(KeyError):
                    del table[k]
            removed += len(doomed)
        for name in ("smtp_dests", "smtp_trip"):
            table = self.table(name)
            for ifindex in ifindexes:
                with contextlib.suppress(KeyError):
                    del table[ctypes.c_uint32(ifindex)]
                    removed += 1
        removed += recent.forget(self.table("smtp_recent"), ifindexes)
        return removed

    def close(self) -> None:
        """Drop our fds; pinned objects and attached filters stay in the kernel."""
        for fd in (self.ingress_fd, self.egress_fd):
            if fd >= 0:
                os.close(fd)
        self.ingress_fd = self.egress_fd = -1
        for t in self.tables.values():
            t.close()
        self.tables = {}
        self._tag = ""  # a later load() looks at the pins afresh

    def unpin(self) -> None:
        """Remove the pinned maps and programs (for --cleanup)."""
        shutil.rmtree(self.pin_dir, ignore_errors=True)
