"""A lab (namespaces, bridge, SMTP sink) and a real agent running in it.

Everything is named from a unique prefix and torn down even when a test
fails: the agent is stopped and cleaned up (--cleanup), then the lab goes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpguard.daemon.netns import run_in
from smtpguard.datapath import attach
from smtpguard.datapath.interfaces import dump_links
from smtpguard.lab import proc, topology

ROOT = Path(__file__).resolve().parents[2]
SG = [sys.executable, "-m", "smtpguard.cli"]
METRICS = "127.0.0.1:9725"


def unique(prefix: str = "sgt") -> str:
    return f"{prefix}{uuid.uuid4().hex[:5]}"


class AgentProc:
    """One `smtpguard run` inside the lab's hypervisor namespace."""

    def __init__(self, lab: topology.Lab, tmp: Path, policy: Path | None = None,
                 enforce: bool = False, backend: str | None = None,
                 launcher: list[str] | None = None) -> None:
        self.lab = lab
        self.policy = policy
        self.enforce = enforce
        self.backend = backend
        self.launcher = launcher or SG
        self.pin_dir = Path(f"/sys/fs/bpf/smtpguard-test/{lab.prefix}")
        self.state_dir = tmp / "state"
        self.socket = tmp / "control.sock"
        self.log_path = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._mark = 0  # events before this index belong to earlier runs

    def args(self) -> list[str]:
        return [*self.launcher, "run", "--netns", self.lab.hv, "--pin-dir", str(self.pin_dir),
                "--state-dir", str(self.state_dir), "--metrics-addr", METRICS,
                "--log-interval", "3600", "--log-level", "debug",
                "--control-socket", str(self.socket),
                *(["--policy", str(self.policy)] if self.policy else []),
                *(["--backend", self.backend] if self.backend else []),
                *([] if self.enforce else ["--no-enforce"])]

    def start(self) -> None:
        self._mark = len(self.events()) if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.wait_event("agent.started", timeout=60)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc.stop(self.proc, sig)
        self.proc = None

    def cleanup(self) -> None:
        """Everything off: filters, pins, our nftables tables and iptables chains."""
        subprocess.run([*SG, "run", "--cleanup", "--netns", self.lab.hv, "--pin-dir",
                        str(self.pin_dir)], capture_output=True, check=False)
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if name is None or ev.get("event") == name:
                    out.append(ev)
        return out

    def wait_event(self, name: str, timeout: float = 10, **fields: Any) -> dict[str, Any]:
        """The first matching event of the current run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events()[self._mark:]:
                if ev.get("event") != name:
                    continue
                if all(ev.get(k) == v for k, v in fields.items()):
                    return ev
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {name} {fields} in {timeout}s:\n"
                             f"{self.log_path.read_text()[-3000:]}")

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """name -> {sorted label pairs: value}, scraped inside the lab."""
        return self.scrape()[0]

    def scrape(self) -> tuple[dict[str, dict[tuple[tuple[str, str], ...], float]], set[str]]:
        """metrics(), and the names of the families declared with no series."""
        def fetch() -> str:
            with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as r:
                return str(r.read().decode())

        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        empty: set[str] = set()
        for fam in text_string_to_metric_families(run_in(self.lab.hv, fetch)):
            if not fam.samples:
                empty.add(fam.name)
            for s in fam.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out, empty

    def ctl(self, *args: str) -> dict[str, Any] | list[Any]:
        """The operator CLI against this agent (--json where it applies)."""
        cmd = [*SG, args[0], "--socket", str(self.socket), *args[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {out.stderr.strip()}")
        try:
            parsed: dict[str, Any] | list[Any] = json.loads(out.stdout)
        except ValueError:
            return {"text": out.stdout}
        return parsed

    def ctl_history(self, vm: str) -> list[dict[str, Any]]:
        from smtpguard.api.control import request

        reply = request(self.socket, {"cmd": "history", "vm": vm})
        return list(reply["transitions"])

    def counter(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include these. A metric the
        scrape does not have (a collector yields nothing when its read fails),
        or whose series lack one of these labels, raises: a failed read never
        reads as 0. 0 only for a declared metric with no matching series."""
        samples, empty = self.scrape()
        fam = samples.get(name)
        if fam is None:
            if name.removesuffix("_total") not in empty:
                raise AssertionError(f"{name} is not in the scrape (read failed or renamed)")
            return 0.0
        keys = {k for series in fam for k, _ in series}
        if not set(labels) <= keys:
            raise AssertionError(f"{name} has no label {sorted(set(labels) - keys)}")
        return sum(v for k, v in fam.items() if all(p in k for p in labels.items()))


def send(lab: topology.Lab, vm: str, connections: int, port: int = 25, ipv6: bool = False,
         destinations: int = 1, rate: float = 0.0, dialog: str = "quit",
         timeout: float = 5.0, to: str | None = None) -> dict[str, int]:
    """`smtpguard lab send`, the real CLI; returns outcome -> count."""
    args = [*SG, "lab", "send", vm, "--name", lab.prefix, "--connections", str(connections),
            "--port", str(port), "--destinations", str(destinations), "--rate", str(rate),
            "--dialog", dialog, "--timeout", str(timeout)]
    if ipv6:
        args.append("--ipv6")
    if to:
        args += ["--to", to]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120)
    result: dict[str, int] = json.loads(out.stdout)["outcomes"]
    return result


def our_filters(lab: topology.Lab) -> dict[str, int]:
    """ifname -> number of smtpg_* tc filters on it, in the lab's hypervisor."""
    def count() -> dict[str, int]:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        out = {}
        with IPRoute() as ipr:
            for ev in dump_links():
                n = 0
                for parent in (attach.INGRESS, attach.EGRESS):
                    try:
                        msgs = ipr.get_filters(ev.ifindex, parent=parent)
                    except NetlinkError as exc:  # gone since the dump: no filter left on it
                        if exc.code != errno.ENODEV:
                            raise  # a failed read is not "no filters"
                        continue
                    n += sum(1 for m in msgs if str(
                        m.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") or "").startswith("smtpg_"))
                if n:
                    out[ev.ifname] = n
        return out

    return run_in(lab.hv, count)


def require_root() -> None:
    """Module fixtures run before the per-test gate: apply the same rule."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("privileged test needs root, and CI=true forbids skipping it")
    pytest.skip("needs root (BPF, namespaces)")


@contextlib.contextmanager
def lab_with_agent(tmp: Path, vms: int, policy: Path | None = None, routed: int = 0,
                   switched: int = 0,
                   enforce: bool = False, backend: str | None = None, start: bool = True,
                   launcher: list[str] | None = None
                   ) -> Iterator[tuple[topology.Lab, AgentProc]]:
    lab = topology.Lab(unique())
    agent = AgentProc(lab, tmp, policy, enforce, backend, launcher)
    try:
        topology.up(lab, vms, routed, switched)
        if start:
            agent.start()
        yield lab, agent
    finally:
        agent.stop()
        agent.cleanup()
        topology.down(lab)


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[topology.Lab, AgentProc]]:
    require_root()
    with lab_with_agent(tmp_path_factory.mktemp("lab"), 3) as pair:
        yield pair


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[tuple[topology.Lab, AgentProc]]:
    require_root()
    with lab_with_agent(tmp_path, 2) as pair:
        yield pair
