"""Compile the classifier with bcc and pin programs and maps, then exit.

The agent runs this in a child process (`python -m smtpguard.datapath.compile`)
so that LLVM's ~170 MB never stay in the long-lived agent, and skips it when
programs built from the same source, flags and kernel are already pinned, or
stored in the agent's cache (prebuilt.py), which it fills with --cache-file.
`--prime --cache-dir DIR` fills that cache ahead of time (make install).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from smtpguard.datapath.build import BPF_SOURCE, PROGRAMS, cflags, pin_programs


def load(bpf_dir: Path, flags: list[str]) -> Any:
    """Compile and load in this process (creates or adopts the pinned maps)."""
    from bcc import BPF

    b = BPF(src_file=str(bpf_dir / BPF_SOURCE).encode(), cflags=flags)
    for prog in PROGRAMS:
        b.load_func(prog.encode(), BPF.SCHED_CLS)
    return b


def compile_and_pin(bpf_dir: Path, pin_dir: Path, flags: list[str], tag: str) -> Any:
    from bcc import BPF

    b = BPF(src_file=str(bpf_dir / BPF_SOURCE).encode(), cflags=flags)
    pin_programs(pin_dir, {p: b.load_func(p.encode(), BPF.SCHED_CLS).fd for p in PROGRAMS},
                 tag)
    return b


def store_cache(b: Any, pin_dir: Path, path: Path, key: dict[str, str]) -> bool:
    """Record the loaded build for starts that skip the compile; a failure
    only costs those starts the compile, so it is reported, not raised."""
    from smtpguard.datapath import prebuilt

    try:
        prebuilt.store(path, key, prebuilt.dump(b, PROGRAMS, pin_dir))
    except (prebuilt.CacheMiss, OSError) as exc:
        print(json.dumps({"cache": "not stored", "reason": str(exc)}))
        return False
    print(json.dumps({"cache": "stored", "path": str(path)}))
    return True


def prime(cache_dir: Path, bpf_dir: Path | None = None) -> bool:
    """Compile with the default sizes into a scratch pin directory and store
    the build in cache_dir (make install: the first start after boot then
    loads it instead of compiling). Nothing is left pinned."""
    import shutil

    from smtpguard.datapath import loader, prebuilt

    bpf_dir = bpf_dir or loader.default_bpf_dir()
    root = Path("/sys/fs/bpf")
    loader.ensure_bpffs(root)
    pin_dir = root / f"smtpguard-prime-{uuid.uuid4().hex[:8]}"
    pin_dir.mkdir()
    try:
        s = loader.Sizes()
        flags = cflags(bpf_dir, pin_dir, s.max_stats, s.max_ifaces, s.conn_table, s.recent)
        key = prebuilt.cache_key(bpf_dir, flags)
        b = load(bpf_dir, flags)
        return store_cache(b, pin_dir, prebuilt.cache_path(cache_dir, key), key)
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(prog="smtpguard-compile")
    ap.add_argument("--bpf-dir", type=Path)
    ap.add_argument("--pin-dir", type=Path)
    ap.add_argument("--tag")
    ap.add_argument("--cache-file", type=Path, help="store the build here")
    ap.add_argument("--cache-key", type=json.loads, help="its key (JSON)")
    ap.add_argument("--prime", action="store_true", help="only fill --cache-dir")
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("cflags", nargs="*")
    args = ap.parse_args()
    try:
        if args.prime:
            if args.cache_dir is None:
                ap.error("--prime needs --cache-dir")
            return 0 if prime(args.cache_dir, args.bpf_dir) else 1
        if args.bpf_dir is None or args.pin_dir is None or not args.tag:
            ap.error("--bpf-dir, --pin-dir and --tag are required")
        b = compile_and_pin(args.bpf_dir, args.pin_dir, args.cflags, args.tag)
        if args.cache_file is not None and args.cache_key is not None:
            store_cache(b, args.pin_dir, args.cache_file, args.cache_key)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
