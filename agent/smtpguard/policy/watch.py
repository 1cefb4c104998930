"""Notice policy edits (inotify), debounced, and ask the agent to reload.

The watch is on the directory: editors save by writing a new file and
renaming it over the old one, which a watch on the file itself would lose.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from smtpguard import logs

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
MASK = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ATTRIB
        | IN_DELETE_SELF | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class PolicyWatcher:
    """Calls `changed()` once a burst of edits to the policy has settled."""

    def __init__(self, path: Path, changed: Callable[[], None], debounce: float = 0.3) -> None:
        self.path = path.resolve()
        self.dir = self.path if self.path.is_dir() else self.path.parent
        self.names = None if self.path.is_dir() else {self.path.name}
        self.changed = changed
        self.debounce = debounce
        self._stop = threading.Event()
        self._fd = -1
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)

    def start(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(fd, str(self.dir).encode(), MASK) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"watching {self.dir}: {os.strerror(err)}")
        self._fd = fd
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _relevant(self, buf: bytes) -> bool:
        off = 0
        hit = False
        while off + _EVENT.size <= len(buf):
            _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
            name = buf[off + _EVENT.size: off + _EVENT.size + length].rstrip(b"\0").decode(
                errors="replace")
            off += _EVENT.size + length
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                hit = True
            elif self.names is None:
                hit |= name.endswith((".yaml", ".yml")) and not name.startswith(".")
            else:
                hit |= name in self.names
        return hit

    def _run(self) -> None:
        pending_since: float | None = None
        while not self._stop.is_set():
            timeout = 0.5 if pending_since is None else max(
                0.0, pending_since + self.debounce - time.monotonic())
            ready, _, _ = select.select([self._fd], [], [], timeout)
            if ready:
                try:
                    buf = os.read(self._fd, 65536)
                except BlockingIOError:
                    continue
                if self._relevant(buf):
                    pending_since = time.monotonic()  # wait for the burst to settle
                continue
            if pending_since is not None and time.monotonic() >= pending_since + self.debounce:
                pending_since = None
                try:
                    self.changed()
                except Exception:
                    logs.get().debug("policy.watch_callback_failed", exc_info=True)
