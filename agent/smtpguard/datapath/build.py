"""What names a build of the classifier: its source, programs, flags and tag,
and where its programs are pinned. Shared by the agent's loader (loader.py)
and the child that compiles (compile.py), which imports the loader, never
the other way round.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

BPF_SOURCE = "smtp_count.c"
PROGRAMS = ("smtpg_ingress", "smtpg_egress")
# Clang warnings from the (foreign-version) kernel headers, not from our code.
QUIET = ["-Wno-duplicate-decl-specifier", "-Wno-ignored-attributes", "-Wno-macro-redefined"]


def cflags(bpf_dir: Path, pin_dir: Path, max_stats: int, max_ifaces: int,
           conn_table: int, recent: int = 65536) -> list[str]:
    return [
        f"-I{bpf_dir}",
        f'-DPIN_DIR="{pin_dir}"',
        f"-DMAX_STATS={max_stats}",
        f"-DMAX_IFACES={max_ifaces}",
        f"-DCONN_TABLE_SIZE={conn_table}",
        f"-DMAX_RECENT={recent}",
        *QUIET,
    ]


def build_tag(bpf_dir: Path, flags: list[str]) -> str:
    """Names one build: the sources, the flags and the running kernel."""
    h = hashlib.sha256()
    for f in sorted(bpf_dir.glob("*.[ch]")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update("\0".join(flags).encode())
    h.update(os.uname().release.encode())
    return h.hexdigest()[:12]


def prog_pin(pin_dir: Path, prog: str, tag: str) -> Path:
    return pin_dir / f"{prog}_{tag}"


def pin_programs(pin_dir: Path, fds: dict[str, int], tag: str) -> None:
    """Pin this build's programs and unpin those of other builds."""
    from smtpguard.datapath.bpfsys import obj_pin

    for prog, fd in fds.items():
        path = prog_pin(pin_dir, prog, tag)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        obj_pin(fd, str(path))
    # Programs of other builds: attached filters keep them alive until replaced.
    for old in pin_dir.glob("smtpg_*_*"):
        if not old.name.endswith(tag):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
