"""A real etcd member for bench/fleet.py: Debian's etcd-server on loopback,
unused ports, a temporary data directory; its revision, call counts and CPU
read back; gone (process and directory) at the end."""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ETCD = "/usr/bin/etcd"


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EtcdServer:
    """One etcd member on loopback, its data in a temporary directory; gone
    (process and directory) when the `with` ends, also on failure."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="smtpguard-bench-etcd-"))
        client, peer = _free_ports(2)
        self.url = f"http://127.0.0.1:{client}"
        self.peer = f"http://127.0.0.1:{peer}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> EtcdServer:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        with open(self.dir / "etcd.log", "wb") as log:
            self.proc = subprocess.Popen(
                [ETCD, "--name", "bench", "--data-dir", str(self.dir / "member"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
                 "--initial-cluster", f"bench={self.peer}"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - before any thread
        deadline = time.monotonic() + 30
        while True:
            try:
                self.revision()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.dir / "etcd.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"etcd did not start: {tail}") from None
                time.sleep(0.2)

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/v3{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            reply: dict[str, Any] = json.loads(r.read())
            return reply

    def revision(self) -> int:
        """The store's revision (maintenance status: not counted as a Range)."""
        return int(self._post("/maintenance/status", {})["header"]["revision"])

    def calls(self) -> dict[str, float]:
        """etcd's own count of gRPC calls handled, by method (the JSON gateway's too)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("grpc_server_handled_total{"):
                labels, value = line[len("grpc_server_handled_total{"):].rsplit("} ", 1)
                method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
                out[method] = out.get(method, 0.0) + float(value)
        return out

    def cpu(self) -> float:
        """CPU seconds etcd has used."""
        assert self.proc is not None
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def fill(self, prefix: str, n: int, value: str) -> None:
        """n records under prefix, 100 puts a transaction."""
        self.put_many([(f"{prefix}/vm{j}", value) for j in range(n)])

    def put_many(self, items: list[tuple[str, str]]) -> None:
        """These keys and values, 100 puts a transaction."""
        for i in range(0, len(items), 100):
            self._post("/kv/txn", {"success": [
                {"request_put": {"key": base64.b64encode(k.encode()).decode(),
                                 "value": base64.b64encode(v.encode()).decode()}}
                for k, v in items[i:i + 100]]})
