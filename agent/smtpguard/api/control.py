"""The control socket: a unix socket, root only, one JSON request line in,
one JSON reply line out. The agent serves it; the operator CLI talks to it.

    {"cmd": "status"}                         -> {"ok": true, "vms": [...]}
    {"cmd": "block", "vm": "web1", "for": 86400, "reason": "ticket 42"}
    {"cmd": "release", "vm": "web1", "for": 3600, "reason": "..."}
    {"cmd": "flags"} | {"cmd": "reload"}
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtpguard import logs
from smtpguard.errors import SmtpguardError

MAX_REQUEST = 65536


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """Accepts on a thread of its own; `handle` runs each request (the agent
    hands it to its main loop and waits for the answer)."""

    def __init__(self, path: Path, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = path
        self.handle = handle
        self.sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a crash
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self.sock = sock
        self._thread.start()
        logs.get().info("control.listening", path=str(self.path))

    def stop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if peer_uid(conn) != 0:
                    reply: dict[str, Any] = {"ok": False, "error": "permission denied: root only"}
                else:
                    reply = self._request(conn)
            except (OSError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
                # Let the peer finish sending before we close: closing with its
                # request unread would make its send fail (EPIPE, or a reset)
                # before it can read why it was refused.
                conn.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + 1.0  # a peer that keeps sending gets 1 s
                while (left := deadline - time.monotonic()) > 0:
                    conn.settimeout(left)
                    if not conn.recv(65536):
                        break

    def _request(self, conn: socket.socket) -> dict[str, Any]:
        data = b""
        while b"\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                return {"ok": False, "error": "request too large"}
        try:
            req = json.loads(data.split(b"\n", 1)[0] or b"null")
        except ValueError:
            return {"ok": False, "error": "bad request: not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": "bad request: expected {\"cmd\": ...}"}
        try:
            return self.handle(req)
        except SmtpguardError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            logs.get().error("control.failed", cmd=req.get("cmd"), error=str(exc))
            return {"ok": False, "error": f"internal error: {exc}"}


def request(path: Path, req: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """One request to the running agent; raises with a one-line reason."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError as exc:
        raise SmtpguardError(f"no agent running (no control socket at {path})") from exc
    except PermissionError as exc:
        raise SmtpguardError(f"{path}: permission denied (root only)") from exc
    except ConnectionRefusedError as exc:
        raise SmtpguardError(f"no agent listening on {path}") from exc
    with sock:
        sock.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise SmtpguardError(f"unreadable reply from the agent: {data[:80]!r}") from exc
    if not reply.get("ok"):
        raise SmtpguardError(str(reply.get("error", "the agent refused")))
    return reply
