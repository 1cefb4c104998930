"""A client for the QEMU guest agent (qemu-guest-agent, from Debian, in the
guest): the system tier's way into its machine, over a virtio-serial port,
so the guest needs no network and no ssh.

The protocol is QMP-like JSON lines; `guest-exec` runs a program and
`guest-exec-status` returns its exit code and base64 output once it ended.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from dataclasses import dataclass
from typing import Any


class GuestAgentError(RuntimeError):
    pass


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str

    def check(self, what: str) -> Result:
        if self.rc != 0:
            raise GuestAgentError(f"{what}: exit {self.rc}\n{self.out}\n{self.err}")
        return self


class GuestAgent:
    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._buf = b""

    def connect(self, timeout: float) -> None:
        """Wait until the agent in the guest answers (it starts late in boot)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.close()
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(self.path)
                self._sync(5)
                return
            except (OSError, GuestAgentError, TimeoutError) as exc:
                last = exc
                time.sleep(1)
        self.close()
        raise GuestAgentError(f"the guest agent at {self.path} did not answer: {last}")

    def _sync(self, timeout: float) -> None:
        """guest-sync-delimited: the agent answers after a 0xff byte, so any
        half-read reply left from before is skipped."""
        assert self._sock is not None
        token = random.randrange(1, 2**31)
        self._sock.sendall(b"\xff" + json.dumps(
            {"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
        self._buf = b""
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, skip_to_sentinel=True)
            if reply.get("return") == token:
                return

    def _read(self, deadline: float, skip_to_sentinel: bool = False) -> dict[str, Any]:
        assert self._sock is not None
        while True:
            if skip_to_sentinel and b"\xff" in self._buf:
                self._buf = self._buf.split(b"\xff")[-1]
                skip_to_sentinel = False
            if not skip_to_sentinel and b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.strip():
                    reply: dict[str, Any] = json.loads(line)
                    return reply
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from the guest agent")
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise GuestAgentError("the guest agent closed the connection")
            self._buf += chunk

    def call(self, command: str, timeout: float = 30, **arguments: Any) -> Any:
        assert self._sock is not None, "connect() first"
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        reply = self._read(time.monotonic() + timeout)
        if "error" in reply:
            raise GuestAgentError(f"{command}: {reply['error']}")
        return reply.get("return")

    def run(self, argv: list[str], timeout: float = 300, stdin: str | None = None) -> Result:
        """Run a program in the guest as root; wait for it and return its output."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin.encode()).decode()
        pid = self.call("guest-exec", **args)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.call("guest-exec-status", pid=pid)
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                self.run(["/bin/kill", "-KILL", str(pid)], timeout=30)
                raise TimeoutError(f"{argv} still running after {timeout} s")
            time.sleep(0.2)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
        rc = st.get("exitcode", 128 + st.get("signal", 0))
        return Result(int(rc), out, err)

    def sh(self, script: str, timeout: float = 300) -> Result:
        return self.run(["/bin/sh", "-c", script], timeout)
