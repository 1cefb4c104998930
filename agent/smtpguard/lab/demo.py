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
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from smtpguard import logs
from smtpguard.daemon.netns import run_in
from smtpguard.errors import LabError
from smtpguard.lab import topology

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


class Stop(Exception):
    """The demo is to end: Ctrl-C, SIGTERM, SIGHUP (its terminal went away), or
    nobody reads its output any more (a closed pipe, a hung-up terminal)."""


class Screen:
    """The live table. On a terminal it is redrawn in place on the alternate
    screen, as top and watch do (the scrollback keeps no stale copies), and the
    last table stays on the normal screen at exit; otherwise plain lines, one
    per VM and refresh. A write that fails (EPIPE, EIO) means the reader is
    gone: it raises Stop, and nothing more is written."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.gone = False
        self._alt = False
        self._last = ""

    def write(self, text: str) -> None:
        if self.gone:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except OSError as exc:  # BrokenPipeError, or EIO from a hung-up terminal
            self.hang_up()
            raise Stop("output closed") from exc

    def hang_up(self) -> None:
        """Nobody reads any more: whatever is still said (logs, the
        interpreter's last flush) goes nowhere instead of failing mid-cleanup."""
        self.gone = True
        self._alt = False
        null = open(os.devnull, "w")  # noqa: SIM115 - lives until exit
        sys.stdout = sys.stderr = null
        logs.configure("warning", null)

    def say(self, text: str) -> None:
        """A progress line (never raises: cleanup goes on without a reader)."""
        with contextlib.suppress(Stop):
            if self._alt:
                return  # kept for the normal screen's summary at exit
            self.write(text + "\n")

    def frame(self, header: str, table: str, rows: list[str]) -> None:
        if not self.tty:
            stamp = time.strftime("%H:%M:%S")
            self.write("".join(f"{stamp} {r}\n" for r in rows))
            return
        if not self._alt:
            self.write("\x1b[?1049h\x1b[?25l")  # alternate screen, cursor hidden
            self._alt = True
        self._last = f"{header}\n\n{table}\n"
        # Home, each line cleared to its end, then everything below: no flicker,
        # no full-screen clear (which some terminals push into the scrollback).
        body = "".join(f"{line}\x1b[K\n" for line in self._last.splitlines())
        self.write(f"\x1b[H{body}\x1b[J")

    def close(self) -> None:
        """Back to the normal screen, with the last table left on it."""
        if self._alt:
            self._alt = False
            with contextlib.suppress(Stop):
                self.write("\x1b[?25h\x1b[?1049l" + self._last)


def _loop_sender(stop: threading.Event, lab: topology.Lab, args: list[str],
                 pause: float) -> None:
    while not stop.is_set():
        subprocess.run([*SG, "lab", "send", *args, "--name", lab.prefix],
                       capture_output=True, check=False)
        stop.wait(pause)


def _table(rows: dict[str, dict[str, Any]], history: dict[str, deque[tuple[float, float]]],
           now: float) -> tuple[str, list[str]]:
    """The table, and the same figures as plain lines (one per VM)."""
    head = f"{'VM':<6} {'ATTEMPTS':>9} {'PER MIN':>8} {'DEST 1m':>8} {'DONE':>7} " \
           f"{'BLOCKED':>8} {'STATE':<8}  ROLE"
    lines = [head, "-" * len(head)]
    plain = []
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
        plain.append(f"vm={vm} attempts={r.get('attempts', 0):.0f} per_min={rate:.0f} "
                     f"dest_1m={r.get('dest_1m', 0):.0f} done={r.get('completed', 0):.0f} "
                     f"blocked={r.get('blocked', 0):.0f} state={r.get('state', 'ok')}")
    return "\n".join(lines), plain


def demo(lab: topology.Lab, duration: float = 0.0, out: TextIO | None = None) -> None:
    """Run until Ctrl-C, SIGTERM, SIGHUP or a closed output (or `duration`
    seconds); always cleans up: agent, enforcement, sink and namespaces."""

    me = os.getpid()
    out = out or sys.stdout
    screen = Screen(out, out.isatty())

    def interrupt(signum: int, frame: object) -> None:
        # Libraries fork helpers (pyroute2's netns.create does); a helper that
        # inherits this handler must just go, not run our cleanup.
        if os.getpid() != me:
            os._exit(1)
        if signum == signal.SIGHUP:  # the terminal is gone
            screen.hang_up()
        raise Stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupt)
    pin_dir = Path(f"/sys/fs/bpf/smtpguard/{lab.prefix}")
    stop = threading.Event()
    agent: subprocess.Popen[bytes] | None = None
    threads: list[threading.Thread] = []
    try:
        if lab.exists():
            topology.down(lab)  # left over from a killed run
        screen.say(f"building lab {lab.prefix} (2 VMs, bridge, SMTP sink) ...")
        topology.up(lab, 2)
        log_path = lab.state_dir / "agent.log"
        screen.say(f"starting the agent in {lab.hv} (log: {log_path}) ...")
        with open(log_path, "ab") as log:
            agent = subprocess.Popen(
                [*SG, "run", "--netns", lab.hv, "--pin-dir", str(pin_dir),
                 "--state-dir", str(lab.state_dir / "state"), "--metrics-addr", METRICS,
                 "--control-socket", str(lab.state_dir / "control.sock"),
                 "--log-interval", "10"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)  # our signals are ours to handle, then its turn
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
        header = (f"smtpguard lab {lab.prefix}: live counts from the agent's /metrics; try "
                  f"`smtpguard status --socket {lab.state_dir / 'control.sock'}`\n"
                  "Ctrl-C stops and cleans up.\nbuilt-in default policy: port 25 blocked "
                  "(except relays), submission ports at 20/minute burst 10, 100 "
                  "destinations in a minute blocks a VM for 1h\n"
                  "ATTEMPTS: distinct connection attempts; BLOCKED: those smtpguard "
                  "rejected (one scrape: never more than ATTEMPTS)")
        while not duration or time.monotonic() - start < duration:
            table, plain = _table(_scrape(lab), history, time.monotonic())
            screen.frame(header, table, plain)
            time.sleep(2)
    except (KeyboardInterrupt, Stop):
        pass
    finally:
        # A second signal (Ctrl-C again, the hang-up after a SIGTERM) must not
        # cut the cleanup short.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        screen.close()
        screen.say("cleaning up ...")
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
        screen.say("lab removed.")
