"""Compile and load the classifier with bcc, its maps pinned in bpffs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpguard import logs
from smtpguard.datapath import maps
from smtpguard.errors import BpfLoadError

BPF_SOURCE = "smtp_count.c"
PINNED_MAPS = ("smtp_stats", "smtp_conns", "smtp_dests", "smtp_ports", "smtp_config")
# Clang warnings from the (foreign-version) kernel headers, not from our code.
QUIET = ["-Wno-duplicate-decl-specifier", "-Wno-ignored-attributes", "-Wno-macro-redefined"]


def default_bpf_dir() -> Path:
    """bpf/ of the checkout, or the copy installed next to the package."""
    here = Path(__file__).resolve()
    for cand in (here.parents[3] / "bpf", here.parents[1] / "bpf"):
        if (cand / BPF_SOURCE).exists():
            return cand
    raise BpfLoadError(f"cannot find {BPF_SOURCE} near {here}")


@dataclass(frozen=True)
class Sizes:
    """Map sizes, fixed when the program loads (a change recreates the maps)."""

    max_stats: int = 32768
    max_ifaces: int = 4096
    conn_table: int = 262144

    def expected(self) -> dict[str, tuple[int, int, int]]:
        """map name -> (key size, value size, max entries)."""
        m = maps.MIRRORS
        return {
            "smtp_stats": (ctypes.sizeof(m["smtp_stats"][0]), ctypes.sizeof(m["smtp_stats"][1]),
                           self.max_stats),
            "smtp_conns": (ctypes.sizeof(m["smtp_conns"][0]), ctypes.sizeof(m["smtp_conns"][1]),
                           self.conn_table),
            "smtp_dests": (4, ctypes.sizeof(maps.DestSketch), self.max_ifaces),
            "smtp_ports": (4, 1, 65536),
            "smtp_config": (4, ctypes.sizeof(maps.SmtpConfig), 1),
        }


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
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(
                mnt
            ) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def pinned_map_info(path: Path) -> dict[str, Any] | None:
    """bpftool's view of a pinned map, or None when nothing is pinned there."""
    if not path.exists():
        return None
    out = subprocess.run(
        ["bpftool", "-j", "map", "show", "pinned", str(path)],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        return None
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def stale_pins(pin_dir: Path, sizes: Sizes) -> list[str]:
    """Pinned maps whose shape differs from what this build would create."""
    stale = []
    for name, (ksz, vsz, n) in sizes.expected().items():
        info = pinned_map_info(pin_dir / name)
        if info is None:
            continue
        if (info.get("bytes_key"), info.get("bytes_value"), info.get("max_entries")) != (
            ksz, vsz, n,
        ):
            stale.append(name)
    return stale


class Datapath:
    """The loaded classifier: program fds for tc, and its maps."""

    def __init__(self, pin_dir: Path, sizes: Sizes | None = None,
                 bpf_dir: Path | None = None) -> None:
        self.pin_dir = pin_dir
        self.sizes = sizes or Sizes()
        self.bpf_dir = bpf_dir or default_bpf_dir()
        self.bpf: Any = None
        self.ingress_fd = -1
        self.egress_fd = -1
        self.compile_seconds = 0.0
        self._tables: dict[str, Any] = {}

    def load(self) -> None:
        """Compile, load and adopt (or create) the pinned maps."""
        log = logs.get(pin_dir=str(self.pin_dir))
        try:
            from bcc import BPF
        except ImportError as exc:
            raise BpfLoadError(
                "bcc is not importable (install Debian's python3-bpfcc: make setup)"
            ) from exc
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        stale = stale_pins(self.pin_dir, self.sizes)
        adopted = not stale and (self.pin_dir / "smtp_stats").exists()
        if stale:
            # The counters cannot be carried into maps of another shape.
            for name in PINNED_MAPS:
                with contextlib.suppress(FileNotFoundError):
                    (self.pin_dir / name).unlink()
            log.warning("datapath.maps_recreated", changed=stale)
        cflags = [
            f"-I{self.bpf_dir}",
            f'-DPIN_DIR="{self.pin_dir}"',
            f"-DMAX_STATS={self.sizes.max_stats}",
            f"-DMAX_IFACES={self.sizes.max_ifaces}",
            f"-DCONN_TABLE_SIZE={self.sizes.conn_table}",
            *QUIET,
        ]
        t0 = time.monotonic()
        try:
            self.bpf = BPF(src_file=str(self.bpf_dir / BPF_SOURCE).encode(), cflags=cflags)
            self.ingress_fd = self.bpf.load_func(b"smtpg_ingress", BPF.SCHED_CLS).fd
            self.egress_fd = self.bpf.load_func(b"smtpg_egress", BPF.SCHED_CLS).fd
        except Exception as exc:
            if not Path(f"/lib/modules/{os.uname().release}/build").exists():
                raise BpfLoadError(
                    f"compiling {BPF_SOURCE}: no kernel headers at "
                    f"/lib/modules/{os.uname().release}/build (run: make setup)"
                ) from exc
            raise BpfLoadError(f"compiling and loading {BPF_SOURCE}: {exc}") from exc
        self.compile_seconds = time.monotonic() - t0
        log.info("bpf.loaded", compile_seconds=round(self.compile_seconds, 3),
                 adopted=adopted)

    def table(self, name: str) -> Any:
        if name not in self._tables:
            self._tables[name] = self.bpf.get_table(name.encode())
        return self._tables[name]

    def set_ports(self, ports: Iterable[int]) -> None:
        """Mark exactly these ports as SMTP, in one batch update."""
        wanted = set(ports)
        table = self.table("smtp_ports")
        keys = (table.Key * 65536)(*range(65536))
        values = (table.Leaf * 65536)(*(1 if p in wanted else 0 for p in range(65536)))
        table.items_update_batch(keys, values)

    def set_no_answer(self, seconds: float) -> None:
        table = self.table("smtp_config")
        table[table.Key(0)] = maps.SmtpConfig(no_answer_ns=int(seconds * 1e9))

    def forget(self, ifindexes: set[int]) -> int:
        """Delete every map entry of these interfaces; returns how many."""
        if not ifindexes:
            return 0
        removed = 0
        for name in ("smtp_stats", "smtp_conns"):
            table = self.table(name)
            doomed = [k for k in table.keys() if k.ifindex in ifindexes]
            for k in doomed:
                with contextlib.suppress(KeyError):
                    del table[k]
            removed += len(doomed)
        dests = self.table("smtp_dests")
        for ifindex in ifindexes:
            with contextlib.suppress(KeyError):
                del dests[dests.Key(ifindex)]
                removed += 1
        return removed

    def close(self) -> None:
        """Drop our fds; pinned maps and attached filters stay in the kernel."""
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None
            self._tables = {}

    def unpin(self) -> None:
        """Remove the pinned maps (for --cleanup)."""
        shutil.rmtree(self.pin_dir, ignore_errors=True)
