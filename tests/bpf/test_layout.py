"""The ctypes mirrors and the C structs must agree byte for byte."""

from __future__ import annotations

import ctypes

import pytest

from smtpguard.datapath import maps
from smtpguard.datapath.loader import Datapath


@pytest.mark.parametrize("name", sorted(maps.MIRRORS))
def test_mirror_sizes_match_bcc(dp: Datapath, name: str) -> None:
    """Every map's Python key/value mirror has the size bcc derived from the C header."""
    table = dp.table(name)
    key, leaf = maps.MIRRORS[name]
    assert ctypes.sizeof(key) == ctypes.sizeof(table.Key)
    assert ctypes.sizeof(leaf) == ctypes.sizeof(table.Leaf)


def test_mirror_field_offsets_match_bcc(dp: Datapath) -> None:
    """Field offsets agree too, so a reordered C struct cannot slip through."""
    for name, (key, leaf) in maps.MIRRORS.items():
        table = dp.table(name)
        for ours, theirs in ((key, table.Key), (leaf, table.Leaf)):
            if not hasattr(ours, "_fields_") or not hasattr(theirs, "_fields_"):
                continue
            for (field, *_), (tfield, *_) in zip(ours._fields_, theirs._fields_, strict=True):
                assert getattr(ours, field).offset == getattr(theirs, tfield).offset, (name, field)
