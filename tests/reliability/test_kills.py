"""SIGKILL at random points of the agent's life (start-up, the first apply,
its loop, in the middle of a reload), over and over, while a blocked VM keeps
knocking: its block never lapses, and what the agent owns in the kernel is
never duplicated nor lost; the state database stays intact."""

from __future__ import annotations

import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kit import lab_with_agent, our_filters, require_root, scale
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology

KILLS = scale(100, 6)
POLICY = """
version: 1
classes:
  default:
    port25: block
    limit: {rate: 600/minute, burst: 50}
    thresholds: []
"""


class Prober:
    """From the blocked VM, a connection attempt every 50 ms: any that
    completes is a lapse of enforcement."""

    def __init__(self, lab: topology.Lab, vm: str) -> None:
        self.lab, self.vm = lab, vm
        self.outcomes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: run_in(lab.vm_ns(vm), self._loop))

    def _loop(self) -> None:
        dest = (topology.dest_addr(3), 587)
        while not self._stop.is_set():
            try:
                with socket.create_connection(dest, timeout=1):
                    what = "completed"
            except ConnectionRefusedError:
                what = "refused"
            except OSError:
                what = "no_answer"
            self.outcomes[what] = self.outcomes.get(what, 0) + 1
            time.sleep(0.05)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def kernel_objects(lab: topology.Lab, backend: str) -> list[str]:
    """What the agent owns at the top level: tables, or jumps from the hooks."""
    def hv(*cmd: str) -> str:
        return subprocess.run(["ip", "netns", "exec", lab.hv, *cmd], capture_output=True,
                              text=True, check=True).stdout

    if backend == "iptables":
        text = hv("iptables-legacy-save", "-t", "filter") + hv("ip6tables-legacy-save", "-t",
                                                               "filter")
        return sorted(ln for ln in text.splitlines()
                      if ln.startswith(("-A FORWARD", "-A INPUT", ":SMTPG")))
    return sorted(ln for ln in hv("nft", "list", "tables").splitlines() if "smtpguard" in ln)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_sigkill_anywhere_never_lapses_and_never_duplicates(tmp_path: Path,
                                                            backend: str) -> None:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    rng = random.Random(1234)
    with lab_with_agent(tmp_path, 1, policy, routed=1, enforce=True,
                        backend=backend) as (lab, agent):
        agent.ctl("block", "rvm1", "--for", "1h", "--reason", "kill test")
        filters, objects = our_filters(lab), kernel_objects(lab, backend)
        reloads = 0
        with Prober(lab, "rvm1") as probe:
            agent.stop(signal.SIGKILL)
            for _ in range(KILLS):
                with open(agent.log_path, "ab") as out:
                    proc = subprocess.Popen(agent.args(), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                try:
                    time.sleep(rng.uniform(0.0, 2.5))  # imports, load, attach, apply, loop
                    if rng.random() < 0.4 and proc.poll() is None:
                        proc.send_signal(signal.SIGHUP)  # kill it in the middle of the reload
                        reloads += 1
                        time.sleep(rng.uniform(0.0, 0.3))
                finally:
                    proc.kill()
                    proc.wait()
            agent.start()
            agent.wait_event("enforce.applied")
            time.sleep(1)
        print(f"\nkills: {KILLS} ({backend}), reloads interrupted: {reloads}, "
              f"probes: {probe.outcomes}")
        assert "completed" not in probe.outcomes, probe.outcomes
        assert probe.outcomes.get("refused", 0) > KILLS  # it really kept knocking
        assert our_filters(lab) == filters  # one filter per hook, no stale one
        assert kernel_objects(lab, backend) == objects  # no second table, jump or chain
        db = sqlite3.connect(agent.state_dir / "state.db")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = {r["vm"]: r for r in agent.ctl("status", "--json")}  # type: ignore[union-attr]
        assert rows["rvm1"]["state"] == "blocked"
