"""A webhook endpoint for tests: collects JSON POSTs, can be down, and can
live inside a network namespace (the lab agent's loopback)."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Receiver:
    def __init__(self, port: int | None = None, netns: str | None = None) -> None:
        self.port = port or free_port()
        self.netns = netns
        self.got: list[dict[str, Any]] = []
        self.server: HTTPServer | None = None

    def up(self) -> None:
        got = self.got
        ready = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        def serve() -> None:
            if self.netns:
                from smtpguard.daemon.netns import enter

                enter(self.netns)
            self.server = HTTPServer(("127.0.0.1", self.port), Handler)
            ready.set()
            self.server.serve_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(5)

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
