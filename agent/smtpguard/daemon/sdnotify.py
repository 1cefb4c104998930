"""systemd readiness and watchdog (sd_notify), without libsystemd.

READY=1 once the agent is up; WATCHDOG=1 from the main loop, only while it
is healthy, every half of WatchdogSec (systemd passes it as WATCHDOG_USEC).
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.addr = addr or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.interval = int(usec) / 2e6 if usec.isdigit() and ours else None
        self._last = 0.0

    def send(self, state: str) -> bool:
        if self.addr is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(state.encode(), self.addr)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self, healthy: bool = True) -> None:
        """Call from the loop; pings at most every half interval, and never
        when the loop is not healthy (systemd then restarts us)."""
        if self.interval is None or not healthy:
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.send("WATCHDOG=1")
