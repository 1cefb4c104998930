"""`make run`: the lab, the agent on the built-in default policy, a well-behaved
VM and a spam bot, and a live table of what the agent counts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from smtpguard.errors import LabError
from smtpguard.lab import topology
from smtpguard.netns import run_in

METRICS = "127.0.0.1:9725"
SG = [sys.executable, "-m", "smtpguard.cli"]
ROLES = {"vm1": "mail relay client: 1 message / 3 s via 587",
         "vm2": "spam bot: 40 connections/s to 500 MX hosts on 25"}


def _scrape(lab: topology.Lab) -> dict[str, dict[str, Any]]:
    """vm -> figures, read from the agent's /metrics inside the lab."""
    def fetch() -> str:
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=2) as r:
            return str(r.read().decode())

    rows: dict[str, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(run_in(lab.hv, fetch)):
        for s in fam.samples:
            vm = s.labels.get("vm")
            if vm is None:
                continue
            row = rows.setdefault(vm, {})
            if s.name == "smtpguard_smtp_connection_attempts_total":
                row["attempts"] = row.get("attempts", 0) + s.value
            elif s.name == "smtpguard_smtp_handshakes_total":
                key = s.labels["outcome"]
                row[key] = row.get(key, 0) + s.value
            elif s.name == "smtpguard_smtp_destinations" and s.labels["window"] == "1m":
                row["dest_1m"] = s.value
            elif s.name == "smtpguard_smtp_blocked_attempts_total":
                row["blocked"] = row.get("blocked", 0) + s.value
            elif s.name == "smtpguard_vm_state" and s.value == 1:
                row["state"] = s.labels["state"]
    return rows


def _loop_sender(stop: threading.Event, lab: topology.Lab, args: list[str],
                 pause: float) -> None:
    while not stop.is_set():
        subprocess.run([*SG, "lab", "send", *args, "--name", lab.prefix],
                       capture_output=True, check=False)
        stop.wait(pause)


def _table(rows: dict[str, dict[str, Any]], history: dict[str, deque[tuple[float, float]]],
           now: float) -> str:
    head = f"{'VM':<6} {'ATTEMPTS':>9} {'PER MIN':>8} {'DEST 1m':>8} {'DONE':>7} " \
           f"{'BLOCKED':>8} {'STATE':<8}  ROLE"
    lines = [head, "-" * len(head)]
    for vm in sorted(rows):
        r = rows[vm]
        h = history.setdefault(vm, deque())
        h.append((now, r.get("attempts", 0)))
        while h and now - h[0][0] > 60:
            h.popleft()
        span = max(now - h[0][0], 1e-9)
        rate = (h[-1][1] - h[0][1]) / span * 60 if len(h) > 1 else 0.0
        lines.append(f"{vm:<6} {r.get('attempts', 0):>9.0f} {rate:>8.0f} "
                     f"{r.get('dest_1m', 0):>8.0f} {r.get('completed', 0):>7.0f} "
                     f"{r.get('blocked', 0):>8.0f} {r.get('state', 'ok'):<8}  "
                     f"{ROLES.get(vm, '')}")
    return "\n".join(lines)


def demo(lab: topology.Lab, duration: float = 0.0) -> None:
    """Run until Ctrl-C or SIGTERM (or `duration` seconds); always cleans up."""

    me = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        # Libraries fork helpers (pyroute2's netns.create does); a helper that
        # inherits this handler must just go, not run our cleanup.
        if os.getpid() != me:
            os._exit(1)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    if lab.exists():
        topology.down(lab)  # left over from a killed run
    pin_dir = Path(f"/sys/fs/bpf/smtpguard/{lab.prefix}")
    stop = threading.Event()
    agent: subprocess.Popen[bytes] | None = None
    threads: list[threading.Thread] = []
    tty = sys.stdout.isatty()
    try:
        print(f"building lab {lab.prefix} (2 VMs, bridge, SMTP sink) ...", flush=True)
        topology.up(lab, 2)
        log_path = lab.state_dir / "agent.log"
        print(f"starting the agent in {lab.hv} (log: {log_path}) ...", flush=True)
        with open(log_path, "ab") as log:
            agent = subprocess.Popen(
                [*SG, "run", "--netns", lab.hv, "--pin-dir", str(pin_dir),
                 "--state-dir", str(lab.state_dir / "state"), "--metrics-addr", METRICS,
                 "--control-socket", str(lab.state_dir / "control.sock"),
                 "--log-interval", "10"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            if agent.poll() is not None:
                raise LabError(f"the agent exited; see {log_path}")
            with contextlib.suppress(OSError):
                _scrape(lab)
                break
            if time.monotonic() > deadline:
                raise LabError(f"the agent did not start in 60 s; see {log_path}")
            time.sleep(0.2)
        senders = [
            ["vm1", "--connections", "1", "--port", "587", "--dialog", "mail"],
            ["vm2", "--connections", "500", "--rate", "40", "--destinations", "500",
             "--timeout", "2"],
        ]
        for args, pause in zip(senders, (3.0, 0.0), strict=True):
            t = threading.Thread(target=_loop_sender, args=(stop, lab, args, pause), daemon=True)
            t.start()
            threads.append(t)
        history: dict[str, deque[tuple[float, float]]] = {}
        start = time.monotonic()
        while not duration or time.monotonic() - start < duration:
            rows = _scrape(lab)
            table = _table(rows, history, time.monotonic())
            if tty:
                sys.stdout.write("\x1b[2J\x1b[H")
            print(f"smtpguard lab {lab.prefix}: live counts from the agent's /metrics; try "
                  f"`smtpguard status --socket {lab.state_dir / 'control.sock'}`\n"
                  f"Ctrl-C stops and cleans up.\nbuilt-in default policy: port 25 blocked "
                  f"(except relays), submission ports at 20/minute burst 10, 100 "
                  f"destinations in a minute blocks a VM for 1h\n\n{table}\n",
                  flush=True)
            time.sleep(2)
    except KeyboardInterrupt:
        pass
    finally:
        print("cleaning up ...", flush=True)
        stop.set()
        if agent is not None and agent.poll() is None:
            agent.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(20)
        subprocess.run([*SG, "run", "--cleanup", "--netns", lab.hv, "--pin-dir", str(pin_dir)],
                       capture_output=True, check=False)
        for t in threads:
            t.join(10)
        topology.down(lab)
