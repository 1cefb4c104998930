"""Compile the classifier with bcc and pin programs and maps, then exit.

The agent runs this in a child process (`python -m smtpguard.datapath.compile`)
so that LLVM's ~170 MB never stay in the long-lived agent, and skips it when
programs built from the same source, flags and kernel are already pinned.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

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


def load(bpf_dir: Path, flags: list[str]) -> Any:
    """Compile and load in this process (creates or adopts the pinned maps)."""
    from bcc import BPF

    b = BPF(src_file=str(bpf_dir / BPF_SOURCE).encode(), cflags=flags)
    for prog in PROGRAMS:
        b.load_func(prog.encode(), BPF.SCHED_CLS)
    return b


def compile_and_pin(bpf_dir: Path, pin_dir: Path, flags: list[str], tag: str) -> None:
    from bcc import BPF

    from smtpguard.datapath.bpfsys import obj_pin

    b = BPF(src_file=str(bpf_dir / BPF_SOURCE).encode(), cflags=flags)
    for prog in PROGRAMS:
        fn = b.load_func(prog.encode(), BPF.SCHED_CLS)
        path = prog_pin(pin_dir, prog, tag)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        obj_pin(fn.fd, str(path))
    # Programs of other builds: attached filters keep them alive until replaced.
    for old in pin_dir.glob("smtpg_*_*"):
        if not old.name.endswith(tag):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(prog="smtpguard-compile")
    ap.add_argument("--bpf-dir", type=Path, required=True)
    ap.add_argument("--pin-dir", type=Path, required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("cflags", nargs="*")
    args = ap.parse_args()
    try:
        compile_and_pin(args.bpf_dir, args.pin_dir, args.cflags, args.tag)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
