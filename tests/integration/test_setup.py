"""`make setup` interrupted anywhere leaves nothing or a venv a later run
finishes: a newcomer's first `make run` stopped a second in must not leave a
`.venv` that every later run trips over (a python without pip)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import ROOT, require_root

SETUP = ROOT / "scripts" / "setup.sh"


def _interrupt_when(venv: Path, appears: str, log: Path) -> None:
    """Run setup.sh for venv, SIGKILL its whole process group the moment
    venv/appears exists (as a closed terminal or a lost ssh session would)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(SETUP)], env={**os.environ, "VENV": str(venv)},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not (venv / appears).exists():
            assert proc.poll() is None, f"setup ended before {appears}: {log.read_text()}"
            assert time.monotonic() < deadline, f"no {appears} in 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_setup_killed_while_making_the_venv_then_run_again_works(tmp_path: Path) -> None:
    """Killed once right after the venv's python appeared (before pip) and
    once while pip installed the dependencies, the next setup leaves a venv
    with its own pip and a working `smtpguard`."""
    require_root()
    venv, log = tmp_path / "venv", tmp_path / "setup.log"
    _interrupt_when(venv, "bin/python", log)
    assert not (venv / "bin" / "pip").exists()  # interrupted where the issue was seen
    _interrupt_when(venv, ".smtpguard-venv", log)
    assert not (venv / "bin" / "smtpguard").exists()
    done = subprocess.run([str(SETUP)], env={**os.environ, "VENV": str(venv)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"],
                         capture_output=True, text=True, check=True)
    assert str(venv) in pip.stdout  # the venv's own pip, not the system's
    version = subprocess.run([str(venv / "bin" / "smtpguard"), "version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("smtpguard ")
