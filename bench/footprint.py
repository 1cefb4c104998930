"""The agent's own footprint, measured on the real process in a scratch
namespace full of VM interfaces (persistent taps named vnetN, as libvirt's):

- start-up to ready (sd_notify READY=1, which systemd waits for) with 100
  interfaces: a first start after boot (nothing pinned; the build stored in
  the state dir, by make install or an earlier compile, is loaded without
  compiling), a first start with nothing stored either (bcc compiles in a
  child, pins, stores, exits) and a restart (the pinned build is reused);
- with 1,000 interfaces (attached, enforced with the default policy): steady
  resident memory, CPU at idle, and the CPU one /metrics scrape costs.

The memory baseline is a process that compiled with bcc in-process and
keeps it, as tools that load with bcc usually do; measured in the same run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from labagent import cpu_seconds
from many import add_ifaces
from smtpguard.daemon.netns import run_in
from smtpguard.lab.proc import stop
from table import Row

SECTION_START = "6 start-up and memory"
SECTION_CPU = "8 agent CPU"
METRICS = "127.0.0.1:9725"
IDLE_SECONDS = 20.0
SCRAPES = 10


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


class Agent:
    """The agent as systemd runs it (Type=notify), in namespace ns."""

    def __init__(self, ns: str, pin: Path, state: Path, log: Path) -> None:
        self.cmd = [sys.executable, "-m", "smtpguard.cli", "run", "--netns", ns,
                    "--pin-dir", str(pin), "--state-dir", str(state),
                    "--control-socket", "", "--log-interval", "3600"]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, metrics: bool = False) -> float:
        """Seconds from exec to READY=1."""
        sock_path = self.log.parent / f"notify-{uuid.uuid4().hex[:6]}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(sock_path))
            sock.settimeout(120)
            env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
            with self.log.open("ab") as out:
                t0 = time.monotonic()
                self.proc = subprocess.Popen(
                    [*self.cmd, "--metrics-addr", METRICS if metrics else ""],
                    stdout=out, stderr=subprocess.STDOUT, env=env)
            while b"READY=1" not in sock.recv(4096):
                pass
            took = time.monotonic() - t0
        sock_path.unlink()
        return took

    def stop(self) -> None:
        stop(self.proc, timeout=30)
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def bcc_in_process_mb() -> float:
    """RSS of a process that compiled the classifier with bcc and keeps it."""
    pin = f"/sys/fs/bpf/smtpguard-bench/inproc-{uuid.uuid4().hex[:8]}"
    code = ("from smtpguard.datapath import compile as c; "
            "from smtpguard.datapath.build import cflags; "
            "from smtpguard.datapath.loader import default_bpf_dir as d; from pathlib import "
            f"Path; import shutil; p=Path({pin!r}); p.mkdir(parents=True); "
            "b=c.load(d(), cflags(d(), p, 32768, 4096, 262144, 65536)); "
            "print(open('/proc/self/status').read()); shutil.rmtree(p)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return next(int(ln.split()[1]) / 1024 for ln in out.splitlines()
                if ln.startswith("VmRSS"))


def scrape(ns: str) -> None:
    def fetch() -> None:
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10) as r:
            r.read()

    run_in(ns, fetch)


def run() -> list[Row]:
    from pyroute2 import IPRoute
    from pyroute2 import netns as nsmod

    ns = f"sgf{uuid.uuid4().hex[:5]}"
    tmp = Path(tempfile.mkdtemp(prefix="sgbench"))
    pin = Path(f"/sys/fs/bpf/smtpguard-bench/{ns}")
    agent = Agent(ns, pin, tmp / "state", tmp / "agent.log")
    nsmod.create(ns)
    try:
        def lo_up() -> None:
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

        run_in(ns, lo_up)
        add_ifaces(ns, 100)
        cold = agent.start()  # empty state dir: compiles, stores the build
        agent.stop()
        restart = agent.start()
        agent.stop()
        # As after a reboot: no filters, pins or tables; the state dir stays.
        subprocess.run([*agent.cmd, "--cleanup"], capture_output=True, check=True)
        first = agent.start()
        agent.stop()
        add_ifaces(ns, 900, start=100)
        at_1000 = agent.start(metrics=True)
        time.sleep(10)  # settle: the first detection steps, the first samples saved
        scrape(ns)
        c0, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle = (cpu_seconds(agent.pid) - c0) / (time.monotonic() - t0)
        c0, t0 = cpu_seconds(agent.pid), time.monotonic()
        for _ in range(SCRAPES):
            scrape(ns)
        per_scrape = ((cpu_seconds(agent.pid) - c0) - idle * (time.monotonic() - t0)) / SCRAPES
        rss = rss_mb(agent.pid)
    finally:
        agent.stop()
        subprocess.run([*agent.cmd, "--cleanup"], capture_output=True, check=False)
        nsmod.remove(ns)
        shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    bcc = bcc_in_process_mb()
    return [
        Row(SECTION_START, "start-up to ready, 100 interfaces, first start after boot",
            first * 1000, "ms", f"nothing stored (compiles) {cold * 1000:,.0f} ms",
            "< 1500 ms", first < 1.5,
            note="nothing pinned: the build stored in the state dir (make install, or the "
                 "last compile) is loaded with bpf(2); with nothing stored, bcc compiles in "
                 "a child process, which pins, stores and exits; restarts reuse the pins"),
        Row(SECTION_START, "start-up to ready, 100 interfaces, first start, nothing stored",
            cold * 1000, "ms"),
        Row(SECTION_START, "start-up to ready, 100 interfaces, restart (pinned build)",
            restart * 1000, "ms", f"first start {first * 1000:,.0f} ms", "< 1500 ms",
            restart < 1.5),
        Row(SECTION_START, "start-up to ready, 1,000 interfaces, restart", at_1000 * 1000, "ms"),
        Row(SECTION_START, "steady RSS, 1,000 interfaces attached and enforced", rss, "MB",
            f"bcc kept in-process: {bcc:.0f} MB", "< 80 MB", rss < 80),
        Row(SECTION_CPU, "agent CPU at idle, 1,000 VMs", idle * 100, "% of a CPU",
            f"measured over {IDLE_SECONDS:.0f} s"),
        Row(SECTION_CPU, "agent CPU per /metrics scrape, 1,000 idle VMs", per_scrape * 1000,
            "ms", f"over {SCRAPES} scrapes, idle CPU subtracted"),
    ]


if __name__ == "__main__":
    for r in run():
        print(r)
