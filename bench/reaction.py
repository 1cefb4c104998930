"""Reaction time: from a VM's 100th distinct destination to its block being
logged (after the nftables element was written), in a lab, over several
VMs. The test suite checks that the block happens; this measures how fast."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

from smtpguard.lab import topology
from smtpguard.lab.traffic import fan_out

TRIALS = 5
POLICY = """version: 1
classes:
  default:
    limit: {rate: 6000/minute, burst: 500}
    thresholds:
      - {name: fanout, metric: destinations, window: 1m, at_least: 100, action: block,
         duration: 1h}
"""


def _events(log: Path, name: str) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == name:
            out.append(ev)
    return out


def _wait(log: Path, name: str, timeout: float, **fields: object) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in _events(log, name):
            if all(ev.get(k) == v for k, v in fields.items()):
                return ev
        time.sleep(0.05)
    raise RuntimeError(f"no {name} {fields} within {timeout} s; see {log}")


def run() -> list[tuple[str, float, str]]:
    lab = topology.Lab(f"sgb{uuid.uuid4().hex[:5]}")
    tmp = Path(tempfile.mkdtemp(prefix="sgbench"))
    pin = Path(f"/sys/fs/bpf/smtpguard-bench/{lab.prefix}")
    (tmp / "policy.yaml").write_text(POLICY)
    log = tmp / "agent.log"
    sg = [sys.executable, "-m", "smtpguard.cli", "run", "--netns", lab.hv, "--pin-dir", str(pin)]
    agent = None
    latencies, estimates = [], []
    try:
        topology.up(lab, TRIALS)
        with log.open("wb") as out:
            agent = subprocess.Popen(
                [*sg, "--state-dir", str(tmp / "state"), "--policy", str(tmp / "policy.yaml"),
                 "--metrics-addr", "", "--control-socket", "", "--log-interval", "3600"],
                stdout=out, stderr=subprocess.STDOUT)
        _wait(log, "agent.started", 60)
        for n in range(1, TRIALS + 1):
            times = fan_out(lab.vm_ns(f"vm{n}"), 120, 20, first=1000 * n)
            ev = _wait(log, "vm.blocked", 10, vm=f"vm{n}")
            at = datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00"))
            latencies.append(at.timestamp() - times[99])
            estimates.append(float(ev["figures"]["fanout"]))  # type: ignore[index]
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(20)
        subprocess.run([*sg, "--cleanup"], capture_output=True, check=False)
        topology.down(lab)
        shutil.rmtree(pin, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return [
        (f"fanout block after the 100th destination, p50 of {TRIALS}",
         statistics.median(latencies) * 1000, "ms (target < 1000)"),
        (f"fanout block after the 100th destination, max of {TRIALS}",
         max(latencies) * 1000, f"ms (estimate at block {min(estimates):.0f}-"
         f"{max(estimates):.0f})"),
    ]
