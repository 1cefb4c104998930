"""What the libvirt binding needs once per process and around each call:
its default event loop, in a thread of its own; the socket check before a
connection; and its errors and close reasons as log text. LibvirtSource
(inventory/libvirt.py) is the one user."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class EventLoop:
    """libvirt's default event loop, in one daemon thread per process.

    virEventRegisterDefaultImpl must precede the first connection and works
    once per process; the thread runs while some source uses it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registered: Any = None  # the module registered with (tests bring fakes)
        self._users = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def acquire(self, lv: Any) -> None:
        with self._lock:
            if self._registered is not lv:
                lv.virEventRegisterDefaultImpl()
                self._registered = lv
            self._users += 1
            if self._thread is None:
                self._stopping.clear()
                self._thread = threading.Thread(
                    target=self._run, args=(lv,), name="libvirt-events", daemon=True)
                self._thread.start()

    def release(self, lv: Any) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._thread is None:
                return
            self._stopping.set()
            # A zero timeout makes the current iteration return.
            lv.virEventAddTimeout(0, lambda timer, _opaque: lv.virEventRemoveTimeout(timer),
                                  None)
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self, lv: Any) -> None:
        while not self._stopping.is_set():
            if lv.virEventRunDefaultImpl() < 0:
                time.sleep(0.1)


EVENT_LOOP = EventLoop()


# virConnectCloseReason, for the close callback's log line.
CLOSE_REASONS = {0: "error", 1: "eof", 2: "keepalive", 3: "client"}


SYSTEM_SOCKETS = ("/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock")


def missing_socket(uri: str) -> str | None:
    """For a local qemu:///system URI, the socket it would use when none of
    them exists (None: present, or a URI whose transport we do not know)."""
    import os
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if parts.scheme != "qemu" or parts.netloc or parts.path != "/system":
        return None
    given = parse_qs(parts.query).get("socket")
    paths = tuple(given) if given else SYSTEM_SOCKETS
    return None if any(os.path.exists(p) for p in paths) else paths[0]


def error_text(exc: Any) -> str:
    """A libvirtError's message (any other exception's text)."""
    try:
        return str(exc.get_error_message() or exc)
    except Exception:
        return str(exc)


def quietly(call: Callable[..., Any], *args: Any) -> Any:
    """call(*args), or None when it raises (tearing down a lost connection)."""
    try:
        return call(*args)
    except Exception:
        return None
