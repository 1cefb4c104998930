"""The ctypes mirrors and the C structs must agree byte for byte."""

from __future__ import annotations

import ctypes
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpguard.datapath import compile as bpfcompile
from smtpguard.datapath.build import BPF_SOURCE, cflags
from smtpguard.datapath.loader import PINNED_MAPS, WAKE_RING, default_bpf_dir, ensure_bpffs


@pytest.fixture(scope="module")
def bcc_module() -> Iterator[Any]:
    """The classifier compiled by bcc in this process, for its view of the types."""
    ensure_bpffs(Path("/sys/fs/bpf"))
    pin = Path(f"/sys/fs/bpf/smtpguard-test/layout-{uuid.uuid4().hex[:8]}")
    pin.mkdir(parents=True)
    b = bpfcompile.load(default_bpf_dir(), cflags(default_bpf_dir(), pin, 64, 8, 64, 64))
    try:
        yield b
    finally:
        b.cleanup()
        shutil.rmtree(pin, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(PINNED_MAPS))
def test_mirror_sizes_match_bcc(bcc_module: Any, name: str) -> None:
    """Every map's Python key/value mirror has the size bcc derived from the C header."""
    table = bcc_module.get_table(name.encode())
    key, leaf = PINNED_MAPS[name]
    assert ctypes.sizeof(key) == ctypes.sizeof(table.Key)
    assert ctypes.sizeof(leaf) == ctypes.sizeof(table.Leaf)


def test_mirror_field_offsets_match_bcc(bcc_module: Any) -> None:
    """Field names and offsets agree too, so a reordered C struct cannot slip through."""
    for name, (key, leaf) in PINNED_MAPS.items():
        table = bcc_module.get_table(name.encode())
        for ours, theirs in ((key, table.Key), (leaf, table.Leaf)):
            if not hasattr(ours, "_fields_"):
                continue
            mine = [(f, getattr(ours, f).offset) for f, *_ in ours._fields_]
            bccs = [(f, getattr(theirs, f).offset) for f, *_ in theirs._fields_]
            assert mine == bccs, name


def test_every_pinned_map_has_a_mirror() -> None:
    """A map the classifier pins is one the loader knows: an unmirrored map
    would never be checked for a stale shape, opened or forgotten."""
    source = (default_bpf_dir() / BPF_SOURCE).read_text()
    pinned = set(re.findall(r'PIN_DIR "/(\w+)"', source))
    assert pinned == {*PINNED_MAPS, WAKE_RING}
