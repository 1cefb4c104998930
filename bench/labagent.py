"""A lab with the real agent running in it, for the benchmarks that need
traffic: built under a unique prefix, and everything removed on the way out
even when the benchmark fails (agent stopped and --cleanup, pins, lab)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology
from smtpguard.lab.proc import stop

METRICS = "127.0.0.1:9725"  # inside the lab's hypervisor namespace


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (or kernel thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Agent:
    lab: topology.Lab
    log: Path

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("event") == name:
                    out.append(ev)
        return out

    def wait_event(self, name: str, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if evs := self.events(name):
                return evs[0]
            time.sleep(0.05)
        raise RuntimeError(f"no {name} within {timeout} s:\n{self.log.read_text()[-2000:]}")

    def counter(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include these."""
        def fetch() -> str:
            with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as r:
                return str(r.read().decode())

        total = 0.0
        for fam in text_string_to_metric_families(run_in(self.lab.hv, fetch)):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


@contextlib.contextmanager
def lab_agent(policy: str, vms: int = 0, routed: int = 0,
              enforce: bool = False) -> Iterator[tuple[topology.Lab, Agent]]:
    """A fresh lab and `smtpguard run` in it on this policy, started and attached."""
    lab = topology.Lab(f"sgb{uuid.uuid4().hex[:5]}")
    tmp = Path(tempfile.mkdtemp(prefix="sgbench"))
    pin = Path(f"/sys/fs/bpf/smtpguard-bench/{lab.prefix}")
    (tmp / "policy.yaml").write_text(policy)
    sg = [sys.executable, "-m", "smtpguard.cli", "run", "--netns", lab.hv, "--pin-dir", str(pin)]
    proc = None
    try:
        topology.up(lab, vms, routed)
        agent = Agent(lab, tmp / "agent.log")
        with agent.log.open("wb") as out:
            proc = subprocess.Popen(
                [*sg, "--state-dir", str(tmp / "state"), "--policy", str(tmp / "policy.yaml"),
                 "--metrics-addr", METRICS, "--control-socket", "", "--log-interval", "3600",
                 *(["--backend", "nftables"] if enforce else ["--no-enforce"])],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        agent.wait_event("agent.started")
        if enforce:
            agent.wait_event("enforce.applied")
        deadline = time.monotonic() + 10
        while agent.counter("smtpguard_interfaces_attached") < vms + routed:
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not attach to every VM interface")
            time.sleep(0.1)
        yield lab, agent
    finally:
        stop(proc)
        subprocess.run([*sg, "--cleanup"], capture_output=True, check=False)
        topology.down(lab)
        shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
