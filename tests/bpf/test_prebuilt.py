"""The stored build (datapath/prebuilt.py): loaded without compiling, the same
program as a compile gives, and never trusted when it does not fit."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from frames import RST, answer, syn4
from smtpguard.datapath import prebuilt
from smtpguard.datapath.loader import Datapath, Sizes, ensure_bpffs
from smtpguard.datapath.testrun import test_run as run_prog

SIZES = Sizes(max_stats=1024, max_ifaces=64, conn_table=1024, recent=1024)


@pytest.fixture
def pin() -> Iterator[Path]:
    ensure_bpffs(Path("/sys/fs/bpf"))
    path = Path(f"/sys/fs/bpf/smtpguard-test/pre-{uuid.uuid4().hex[:8]}")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start(pin: Path, cache: Path, sizes: Sizes = SIZES) -> Datapath:
    dp = Datapath(pin, sizes, cache_dir=cache)
    dp.load()
    return dp


def reboot(dp: Datapath) -> None:
    """What a reboot leaves: no pins (the state dir's cache stays)."""
    dp.close()
    dp.unpin()


def stored(cache: Path) -> Path:
    (path,) = cache.glob("classifier-*.json")
    return path


def shapes(pin: Path) -> dict[str, Any]:
    """bpftool's view of the pinned objects, without ids or load times."""
    out: dict[str, Any] = {}
    for p in sorted(pin.iterdir()):
        kind = "prog" if p.name.startswith("smtpg_") else "map"
        info = json.loads(subprocess.run(["bpftool", "-j", kind, "show", "pinned", str(p)],
                                         capture_output=True, text=True, check=True).stdout)
        keep = (("type", "tag", "bytes_xlated", "gpl_compatible") if kind == "prog" else
                ("type", "bytes_key", "bytes_value", "max_entries", "flags"))
        out[p.name] = {k: info.get(k) for k in keep}
        if kind == "map":  # typed (bpftool dumps it formatted), whatever the ids
            out[p.name]["btf"] = "btf_id" in info or info["type"] == "ringbuf"
    return out


def counts(dp: Datapath) -> list[tuple[int, int, int, int, int]]:
    """The same traffic through a freshly loaded datapath: per-port counters."""
    for seq in (1, 1, 2):  # two attempts, one retransmission
        run_prog(dp.ingress_fd, syn4(seq=seq))
    run_prog(dp.egress_fd, answer(RST, 2))
    run_prog(dp.ingress_fd, syn4(seq=3, dport=587))
    return sorted((k.port, v.attempts, v.retransmits, v.reset, v.packets)
                  for k, v in dp.table("smtp_stats").items())


def test_stored_build_loads_without_compiling_and_is_the_same_program(
        pin: Path, tmp_path: Path) -> None:
    """A start with nothing pinned but a stored build loads it with bpf(2), no
    compile: the kernel sees the same programs (tags over the instructions)
    and maps of the same shapes, and they count alike."""
    cache = tmp_path / "state" / "bpf-cache"
    dp = start(pin, cache)
    assert dp.source == "compiled"
    dp.set_ports((25, 587))
    compiled, compiled_counts = shapes(pin), counts(dp)
    path = stored(cache)
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    reboot(dp)

    dp = start(pin, cache)
    try:
        assert dp.source == "cache"  # no child, no compile
        assert shapes(pin) == compiled
        dp.set_ports((25, 587))
        assert counts(dp) == compiled_counts
    finally:
        dp.close()
    # Then the pins, as on any restart.
    dp = start(pin, cache)
    assert dp.source == "pinned"
    dp.close()


def test_primed_cache_serves_another_pin_dir(pin: Path, tmp_path: Path) -> None:
    """`compile --prime` (make install) stores the build the agent looks up,
    whatever its pin dir, and leaves nothing pinned."""
    cache = tmp_path / "bpf-cache"
    before = set(Path("/sys/fs/bpf").iterdir())
    out = subprocess.run([sys.executable, "-m", "smtpguard.datapath.compile", "--prime",
                          "--cache-dir", str(cache)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["cache"] == "stored"
    assert set(Path("/sys/fs/bpf").iterdir()) == before
    dp = start(pin, cache, Sizes())
    try:
        assert dp.source == "cache"
    finally:
        dp.close()


def _rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Store a changed record under the same name, with a valid checksum."""
    doc = json.loads(path.read_text())
    doc.pop("checksum")
    change(doc)
    key = doc.pop("key")
    tmp = path.with_suffix(".new")
    prebuilt.store(tmp, key, doc)
    os.replace(tmp, path)


def _other_kernel(doc: dict[str, Any]) -> None:
    doc["key"]["kernel"] = "6.1.0-99-amd64 #1 SMP x86_64"


def _swap(path: Path, old: str, new: str) -> None:
    """Edit the stored text behind the checksum's back (old must be there)."""
    text = path.read_text()
    assert old in text, f"{old} not in the stored build"
    path.write_text(text.replace(old, new))


def _bad_insns(doc: dict[str, Any]) -> None:
    prog = doc["programs"]["smtpg_ingress"]
    insns = bytearray(base64.b64decode(prog["insns"]))
    insns[0] = 0xFF  # no such opcode
    prog["insns"] = base64.b64encode(insns).decode()


def _short_insns(doc: dict[str, Any]) -> None:
    doc["programs"]["smtpg_ingress"]["insns"] = "/////////////w=="


def _missing_map(doc: dict[str, Any]) -> None:
    doc["programs"]["smtpg_egress"]["maps"][0][1] = "no_such_map"


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "garbage": (lambda p: p.write_bytes(b"\x00\xffnot json"), "unreadable"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:1000]), "unreadable"),
    "tampered": (lambda p: _swap(p, '"Dual BSD/GPL"', '"MIT"'), "checksum mismatch"),
    "other kernel": (lambda p: _rewrite(p, _other_kernel), "built for another key"),
    "refused by the kernel": (lambda p: _rewrite(p, _bad_insns), "the kernel refused it"),
    "relocation": (lambda p: _rewrite(p, _missing_map), "does not fit"),
    "short program": (lambda p: _rewrite(p, _short_insns), "bytes of instructions"),
    "writable by others": (lambda p: p.chmod(0o666), "writable by others"),
    "gone": (lambda p: p.unlink(), "no stored build"),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_unusable_stored_build_falls_back_to_compiling(
        pin: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A stored build that is corrupt, stale (another kernel), unsafe or that
    the kernel refuses is never used: the start compiles, says why, counts,
    and stores a good build again."""
    cache = tmp_path / "bpf-cache"
    reboot(start(pin, cache))
    spoil, reason = CORRUPTIONS[damage]
    spoil(stored(cache))
    capsys.readouterr()

    dp = start(pin, cache)
    try:
        assert dp.source == "compiled"
        logged = capsys.readouterr().out
        assert "bpf.cache_miss" in logged and reason in logged, logged
        dp.set_ports((25, 587))
        assert counts(dp)[0][:3] == (25, 2, 1)
    finally:
        reboot(dp)
    dp = start(pin, cache)  # the compile stored a good build again
    assert dp.source == "cache"
    dp.close()


def test_the_kernel_is_told_the_license_the_source_declares(pin: Path, tmp_path: Path) -> None:
    """bpf/smtp_count.c is dual GPL-2.0/BSD-2-Clause and says so to the
    kernel (BPF_LICENSE "Dual BSD/GPL", GPL-compatible as its helpers need),
    compiled and when loaded from the stored build alike."""
    source = (Path(__file__).resolve().parents[2] / "bpf" / "smtp_count.c").read_text()
    assert source.startswith("// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)")
    assert "#define BPF_LICENSE Dual BSD/GPL" in source
    cache = tmp_path / "state" / "bpf-cache"
    dp = start(pin, cache)
    assert all(s["gpl_compatible"] for n, s in shapes(pin).items() if n.startswith("smtpg_"))
    reboot(dp)
    assert json.loads(stored(cache).read_text())["license"] == "Dual BSD/GPL"
    dp = start(pin, cache)
    try:
        assert dp.source == "cache"
        assert all(s["gpl_compatible"] for n, s in shapes(pin).items()
                   if n.startswith("smtpg_"))
    finally:
        dp.close()
