"""POST flag/throttle/block/release events to the abuse desk's webhook.

A bounded queue and a thread of its own: the agent's loop only enqueues and
never waits. Events go out in order; a failed POST is retried with
exponential backoff (0.5 s doubling to 30 s) until it succeeds, holding back
the ones behind it. When the queue is full the oldest event is dropped and
counted.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Any

from smtpguard import __version__, logs


class Webhook:
    def __init__(self, url: str, timeout: float = 5.0, queue: int = 1000,
                 events: tuple[str, ...] = ("flagged", "throttled", "blocked", "released"),
                 max_backoff: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self.events = {f"vm.{e}" for e in events}
        self.max_backoff = max_backoff
        self._q: deque[dict[str, Any]] = deque(maxlen=queue)
        self._cv = threading.Condition()
        self._stop = False
        self.sent = 0
        self.dropped = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def offer(self, event: dict[str, Any]) -> None:
        """Enqueue without blocking; drops the oldest when full."""
        if event.get("event") not in self.events:
            return
        with self._cv:
            if len(self._q) == self._q.maxlen:
                self.dropped += 1
                logs.get().warning("webhook.dropped", url=self.url, dropped=self.dropped)
            self._q.append(event)
            self._cv.notify()

    def pending(self) -> int:
        return len(self._q)

    def stop(self, drain: float = 2.0) -> None:
        deadline = time.monotonic() + drain
        while self._q and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(2)

    def _post(self, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"smtpguard/{__version__}"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            if resp.status >= 300:
                raise urllib.error.HTTPError(self.url, resp.status, "not 2xx", resp.headers, None)

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                event = self._q[0]
            try:
                self._post(event)
            except (OSError, urllib.error.URLError) as exc:
                self.failures += 1
                logs.get().debug("webhook.retry", url=self.url, error=str(exc), backoff=backoff)
                with self._cv:
                    self._cv.wait(backoff)
                    if self._stop:
                        return
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.5
            self.sent += 1
            with self._cv:
                if self._q and self._q[0] is event:
                    self._q.popleft()
