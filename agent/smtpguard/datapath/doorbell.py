"""The classifier's doorbell: one word it sets when counts change, and a
ring it writes one record to when the word goes from 0 to 1.

The agent maps the word into its memory (a BPF_F_MMAPABLE array) and waits
on the ring's fd (readable while a record is unread), so it sleeps until
there is something to count and wakes within microseconds when there is.
Only when the word is set does the agent read the maps and run detection.
Clearing comes before reading, so a change made during a read rings again.
The records carry nothing: the agent skips them by moving the ring's
consumer position up to its producer position."""

from __future__ import annotations

import mmap
import os
import select
import struct

from smtpguard.datapath.bpfsys import obj_get


class Doorbell:
    def __init__(self, word_fd: int, ring_path: str) -> None:
        self._word = mmap.mmap(word_fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        self._ring = obj_get(ring_path)
        # Page 0: the consumer position (ours to write); page 1: the producer's.
        self._consumer = mmap.mmap(self._ring, mmap.PAGESIZE, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(self._ring, mmap.PAGESIZE, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=mmap.PAGESIZE)
        self._poll = select.poll()
        self._poll.register(self._ring, select.POLLIN)

    def pending(self) -> bool:
        """Whether the bell rang and was not answered yet."""
        return bool(struct.unpack_from("=I", self._word, 0)[0])

    def rung(self) -> bool:
        """Whether the bell rang since the last answer; answers it."""
        if not self.pending():
            return False
        struct.pack_into("=I", self._word, 0, 0)
        return True

    def wait(self, timeout: float) -> bool:
        """Sleep until a record arrives (True) or timeout passes; skips the
        records, so the ring is quiet until the word is cleared and set again."""
        if not self._poll.poll(int(timeout * 1000)):
            return False
        head = struct.unpack_from("=Q", self._producer, 0)[0]
        struct.pack_into("=Q", self._consumer, 0, head)
        return True

    def close(self) -> None:
        for m in (self._word, self._consumer, self._producer):
            m.close()
        os.close(self._ring)
