"""The classifier's doorbell: one word it sets when counts change.

The agent maps the word into its memory (a BPF_F_MMAPABLE array) and looks
at it as often as it likes for the price of a memory read; only when it is
set does the agent read the maps and run detection. Clearing comes before
reading, so a change made during a read rings the bell again."""

from __future__ import annotations

import mmap
import struct


class Doorbell:
    def __init__(self, fd: int) -> None:
        self._mem = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)

    def rung(self) -> bool:
        """Whether the bell rang since the last answer; answers it."""
        if not struct.unpack_from("=I", self._mem, 0)[0]:
            return False
        struct.pack_into("=I", self._mem, 0, 0)
        return True

    def close(self) -> None:
        self._mem.close()
