"""A real etcd (Debian's etcd-server) for fleet tests, in a namespace of its
own that each lab's hypervisor namespace is wired to, as hypervisors reach
their etcd over a management network:

    <prefix>-etcd   bridge br0 198.18.254.1/24; etcd listens there (2379)
    lab N's hv      sgfl0 198.18.254.(10+N)/24, its veth peer on that bridge

Nothing else is routed: the agents reach etcd and nothing more. The agents
see sgfl0 as a host link (no interface pattern matches it).

EtcdKit(prefix, loopback=True) is etcd on 127.0.0.1 (unused ports) for tests
whose hosts are FleetSync instances in the test's own process: etcd's gRPC
client keeps process-wide threads, made in the namespace of the first use, so
they must all reach etcd from the namespace the test runs in.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology

ADDR = "198.18.254.1"
URL = f"http://{ADDR}:2379"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """etcd asked to stop, then killed after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait(fn: Callable[[], Any], timeout: float = 15) -> Any:
    """fn's value once it is true, polled until timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class EtcdKit:
    def __init__(self, prefix: str, loopback: bool = False) -> None:
        self.loopback = loopback
        self.ns = f"{prefix}-etcd"
        if loopback:
            client, peer = _free_ports(2)
            self.url, self.peer = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        else:
            self.url, self.peer = URL, f"http://{ADDR}:2380"
        self.prefix = f"/sgt/{prefix}"  # the fleet's key prefix for this run
        self.data = Path(tempfile.mkdtemp(prefix=f"{prefix}-etcd-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.labs: list[str] = []

    def up(self) -> None:
        from pyroute2 import IPRoute, netns

        if self.loopback:
            self.start()
            return
        netns.create(self.ns)
        with IPRoute(netns=self.ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname="br0", kind="bridge")
            br = ipr.link_lookup(ifname="br0")[0]
            ipr.addr("add", index=br, address=ADDR, prefixlen=24)
            ipr.link("set", index=br, state="up")
        self.start()

    def start(self) -> None:
        log = open(self.data / "etcd.log", "ab")  # noqa: SIM115 - the child's
        where = [] if self.loopback else ["ip", "netns", "exec", self.ns]
        self.proc = subprocess.Popen(
            [*where, "etcd", "--name", "sgt",
             "--data-dir", str(self.data / "member"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", self.peer,
             "--initial-advertise-peer-urls", self.peer,
             "--initial-cluster", f"sgt={self.peer}"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/health-probe")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"etcd did not start: {self.log()[-2000:]}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def down(self) -> None:
        from pyroute2 import netns

        self.stop()
        if not self.loopback and self.ns in netns.listnetns():
            netns.remove(self.ns)
        shutil.rmtree(self.data, ignore_errors=True)

    def log(self) -> str:
        return (self.data / "etcd.log").read_text(errors="replace")

    def connect(self, lab: topology.Lab, n: int) -> None:
        """Wire a lab's hypervisor namespace to etcd."""
        from pyroute2 import IPRoute

        peer = f"hv{n}"
        with IPRoute(netns=self.ns) as ipr:
            ipr.link("add", ifname=peer, kind="veth", peer={"ifname": "sgfl0",
                                                           "net_ns_fd": lab.hv})
            idx = ipr.link_lookup(ifname=peer)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
        with IPRoute(netns=lab.hv) as ipr:
            idx = ipr.link_lookup(ifname="sgfl0")[0]
            ipr.addr("add", index=idx, address=f"198.18.254.{10 + n}", prefixlen=24)
            ipr.link("set", index=idx, state="up")

    # -- reading it, as an operator with etcdctl would --------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:

        def call() -> dict[str, Any]:
            req = urllib.request.Request(f"{self.url}/v3{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                reply: dict[str, Any] = json.loads(r.read())
                return reply

        result: dict[str, Any] = call() if self.loopback else run_in(self.ns, call)
        return result

    def metrics(self) -> str:
        """etcd's own /metrics."""
        def fetch() -> str:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
                return str(r.read().decode())
        return fetch() if self.loopback else str(run_in(self.ns, fetch))

    def get(self, key: str) -> dict[str, Any] | None:
        reply = self._post("/kv/range", {"key": base64.b64encode(key.encode()).decode()})
        kvs = reply.get("kvs", [])
        if not kvs:
            return None
        value: dict[str, Any] = json.loads(base64.b64decode(kvs[0]["value"]))
        return value

    def put(self, key: str, value: str) -> int:
        """Write a key, as an operator with etcdctl would; the new revision."""
        reply = self._post("/kv/put", {"key": base64.b64encode(key.encode()).decode(),
                                       "value": base64.b64encode(value.encode()).decode()})
        return int(reply["header"]["revision"])
