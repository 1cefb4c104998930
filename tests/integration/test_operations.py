"""Operations: the systemd unit, `make install` into a temporary root, sd_notify
readiness and watchdog, and the Vagrant box."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import lab_with_agent, require_root

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "smtpguard.service"


def install(dest: Path, *args: str) -> None:
    env = {**os.environ, "DESTDIR": str(dest)}
    subprocess.run([str(ROOT / "scripts" / "install.sh"), *args], env=env, check=True,
                   capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def destroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("root")
    install(dest)
    return dest


def unit_paths(text: str) -> list[str]:
    """Absolute paths the unit refers to (commands, files, config)."""
    return sorted(set(re.findall(r"(/(?:opt|etc)/[\w./-]+)", text)))


def test_install_puts_every_file_where_the_unit_expects_it(destroot: Path) -> None:
    """Every path the unit names exists in the installed tree, the installed
    agent runs and finds its BPF source next to its venv."""
    for path in unit_paths(UNIT.read_text()):
        if path.startswith("/etc/systemd"):
            continue
        assert (destroot / path.lstrip("/")).exists(), path
    assert (destroot / "etc/systemd/system/smtpguard.service").read_text() == UNIT.read_text()
    venv_py = destroot / "opt/smtpguard/venv/bin/python"
    out = subprocess.run([str(venv_py), "-c", "from smtpguard.datapath.loader import "
                          "default_bpf_dir; print(default_bpf_dir())"],
                         capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == str(destroot / "opt/smtpguard/bpf")
    ok = subprocess.run([str(destroot / "opt/smtpguard/venv/bin/smtpguard"), "policy", "check",
                         str(destroot / "etc/smtpguard/policy.yaml")], capture_output=True)
    assert ok.returncode == 0, ok.stderr


def test_install_is_idempotent_and_keeps_the_operators_config(destroot: Path) -> None:
    policy = destroot / "etc/smtpguard/policy.yaml"
    policy.write_text("version: 1\nrelays: [198.51.100.25/32]\n")
    install(destroot)
    assert "198.51.100.25" in policy.read_text()
    install(destroot, "--uninstall")
    assert not (destroot / "opt/smtpguard").exists()
    assert not (destroot / "etc/systemd/system/smtpguard.service").exists()
    assert policy.exists()  # config and state are kept...
    install(destroot, "--uninstall", "--purge")
    assert not policy.exists()  # ...unless purged
    install(destroot)  # and it installs again


def test_unit_verifies_and_its_exposure_is_reported(destroot: Path, tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit (pointed at the installed tree),
    and the security exposure is the figure the README reports."""
    if not (destroot / "opt/smtpguard").exists():
        install(destroot)
    unit = tmp_path / "smtpguard.service"
    unit.write_text(UNIT.read_text().replace("/opt/smtpguard", f"{destroot}/opt/smtpguard"))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                         capture_output=True, text=True)
    m = re.search(r"Overall exposure level for smtpguard.service: ([\d.]+)", sec.stdout)
    assert m, sec.stdout[-500:]
    readme = (ROOT / "README.md").read_text()
    assert f"exposure level {m.group(1)}" in readme, m.group(1)


def test_agent_sends_ready_and_watchdog_pings(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Started the way the unit starts it (with NOTIFY_SOCKET and WATCHDOG_USEC
    set), the agent says READY=1 once up and pings the watchdog while healthy."""
    require_root()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    got: list[str] = []
    with lab_with_agent(tmp_path, 1, enforce=True):
        deadline = time.monotonic() + 10
        while got.count("WATCHDOG=1") < 3 and time.monotonic() < deadline:
            try:
                got.append(sock.recv(4096).decode().split("\n")[0])
            except TimeoutError:
                pass
    sock.close()
    assert got[0] == "READY=1", got
    assert got.count("WATCHDOG=1") >= 3, got


def test_vagrantfile_validates_and_provisions_with_the_make_setup() -> None:
    """The box runs the project's own setup, the same as `make setup`."""
    vagrantfile = (ROOT / "vagrant" / "Vagrantfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    setup = re.search(r"^setup:\n\t@?(.+)$", makefile, re.M)
    assert setup and setup.group(1).strip() == "scripts/setup.sh"
    assert 'inline: "cd /vagrant && make setup"' in vagrantfile
    # The public box unless SMTPGUARD_BOX names another (the locally built one).
    assert 'config.vm.box = env.("SMTPGUARD_BOX") || "debian/bookworm64"' in vagrantfile
    assert shutil.which("vagrant"), "make test's setup installs vagrant"
    out = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT / "vagrant",
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "VAGRANT_DOTFILE_PATH": "/tmp/smtpguard-vagrant"})
    assert out.returncode == 0, out.stdout + out.stderr
