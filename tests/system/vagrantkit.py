"""`vagrant up` for real, on this machine: the project's vagrant/Vagrantfile
with the box scripts/vagrant-box.sh builds from Debian packages, run against a
private libvirtd (tests/hypervisor/libvirtd.py), and the lab demo in the guest.

    with VagrantVM() as vm:                    # prefix sghv<5 hex>
        vm.up()                                # box (cached), vagrant up --no-provision
        vm.provision()                         # provisioner "setup": make setup
        vm.ssh("uname -r")                     # -> Completed(rc, out)
        run = vm.demo(signal.SIGINT, until=...)    # `sudo make run`, piped
        vm.timings                             # {"box": 2.1, "up": 95.3, ...}

Vagrant runs inside the private libvirtd's network namespace (`ip netns
exec <prefix>-hv`), where libvirt creates the management network's bridge,
so vagrant's ssh reaches the guest and nothing of it is on the host's own
network. The management network is isolated (forward mode none: no NAT, no
route out), the domain is TCG unless SMTPGUARD_LIBVIRT_DRIVER says kvm (nested
KVM hangs here), and every object is named from the prefix: domain
<prefix>-lab, network <prefix>-mgmt, pool <prefix>-pool, the libvirtd's
directory and vagrant's machine state under /run/smtpguard-test/<prefix>.
close() (or the `with`) removes them all, also when the test failed:
`vagrant destroy -f`, then domains, networks, pools, the daemons, the
directories. Boxes live in VAGRANT_HOME (CACHE/vagrant-home), added once
per box build.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "hypervisor"))

from libvirtd import (  # noqa: E402
    RUN_ROOT,
    Libvirtd,
    _kill_pidfiles,
    _proc_identity,
    unique,
)

CACHE = Path(os.environ.get("SMTPGUARD_TEST_CACHE", "/var/cache/smtpguard-test"))
VAGRANT_HOME = CACHE / "vagrant-home"
BOX = "smtpguard/bookworm-local"
BOX_SCRIPT = ROOT / "scripts" / "vagrant-box.sh"
MGMT_ADDRESS = "192.168.121.0/24"  # inside the private namespace: clashes with nothing
DEMO_PIDFILE = "/run/smtpguard-demo.pgid"


@dataclass
class Completed:
    rc: int
    out: str


@dataclass
class DemoRun:
    """What one demo printed (each line with its arrival time), and how it ended."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    rc: int | None = None
    seconds_to_first_row: float | None = None
    seconds_to_exit_after_signal: float | None = None
    seconds_total: float | None = None

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def rows(self) -> list[dict[str, str]]:
        """The plain `HH:MM:SS vm=... attempts=...` rows, parsed."""
        rows = []
        for _, line in self.lines:
            words = line.split()
            if len(words) > 1 and words[1].startswith("vm="):
                rows.append(dict(w.split("=", 1) for w in words[1:] if "=" in w))
        return rows


class VagrantVM:
    """One Vagrant machine of the project's Vagrantfile on a private libvirtd."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or unique("sghv")
        self.hv = Libvirtd(self.prefix)
        self.name = f"{self.prefix}-lab"
        self.network = f"{self.prefix}-mgmt"
        self.pool = f"{self.prefix}-pool"
        self.dotfile = self.hv.dir / "vagrant"
        self.driver = os.environ.get("SMTPGUARD_LIBVIRT_DRIVER", "qemu")
        self.timings: dict[str, float] = {}
        self.box_built = False
        self._created = False

    # -- lifetime -----------------------------------------------------------

    def __enter__(self) -> VagrantVM:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        """The box (built or reused, added to VAGRANT_HOME), the private
        libvirtd and the storage pool vagrant-libvirt will use."""
        started = time.monotonic()
        out = subprocess.run([str(BOX_SCRIPT), "--add"], capture_output=True, text=True,
                             env={**os.environ, "VAGRANT_HOME": str(VAGRANT_HOME),
                                  "SMTPGUARD_BOX": BOX})
        if out.returncode != 0:
            raise AssertionError(f"scripts/vagrant-box.sh failed:\n{out.stderr}")
        self.box_built = "vagrant-box: built " in out.stderr
        self.timings["box build" if self.box_built else "box (cached)"] = \
            time.monotonic() - started
        started = time.monotonic()
        sweep()
        self.hv.open()
        self._created = True
        pool = self.hv.conn().storagePoolDefineXML(
            f"<pool type='dir'><name>{self.pool}</name>"
            f"<target><path>/var/lib/libvirt/{self.pool}</path></target></pool>")
        pool.build(0)
        pool.create(0)
        self.timings["libvirtd"] = time.monotonic() - started

    def close(self) -> None:
        """Remove everything this kit made; every step runs even if one fails."""
        errors: list[Exception] = []

        def step(fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception as exc:
                errors.append(exc)

        if self._created:
            if self.dotfile.exists():
                started = time.monotonic()
                step(lambda: self.vagrant("destroy", "-f", timeout=300, check=True))
                self.timings["vagrant destroy"] = time.monotonic() - started
            step(self._remove_pools)
            step(self.hv.close)  # domains, networks, daemons, namespaces, its directory
            self._created = False
        if errors:
            raise ExceptionGroup(f"cleaning up vagrant kit {self.prefix}", errors)

    def _remove_pools(self) -> None:
        if self.hv.pid("libvirtd") is None:
            return
        for pool in self.hv.conn().listAllStoragePools():
            if pool.isActive():
                for vol in pool.listAllVolumes():
                    vol.delete(0)
                pool.destroy()
            pool.undefine()

    # -- vagrant ------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """What the project's Vagrantfile reads (vagrant/Vagrantfile), plus
        vagrant's own homes: boxes cached, machine state per kit."""
        return {**os.environ,
                "VAGRANT_HOME": str(VAGRANT_HOME),
                "VAGRANT_DOTFILE_PATH": str(self.dotfile),
                "VAGRANT_DEFAULT_PROVIDER": "libvirt",
                "VAGRANT_CHECKPOINT_DISABLE": "1",
                "VAGRANT_NO_COLOR": "1",
                "SMTPGUARD_BOX": BOX,
                "SMTPGUARD_LIBVIRT_URI": self.hv.uri,
                "SMTPGUARD_LIBVIRT_DRIVER": self.driver,
                "SMTPGUARD_VM_NAME": self.name,
                "SMTPGUARD_MGMT_NETWORK": self.network,
                "SMTPGUARD_MGMT_ADDRESS": MGMT_ADDRESS,
                "SMTPGUARD_POOL": self.pool}

    def argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.hv.netns, "vagrant", *args]

    def vagrant(self, *args: str, timeout: float = 1800, check: bool = True) -> Completed:
        """`vagrant ARGS` in vagrant/ (output merged), failing with its tail."""
        out = subprocess.run(self.argv(*args), cwd=ROOT / "vagrant", env=self.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"vagrant {' '.join(args)} exited {out.returncode}:\n"
                                 f"{out.stdout[-6000:]}\n{self._libvirt_tail()}")
        return Completed(out.returncode, out.stdout)

    def up(self) -> Completed:
        """`vagrant up --no-provision`: define, boot, ssh in, rsync /vagrant."""
        started = time.monotonic()
        out = self.vagrant("up", "--no-provision")
        self.timings["vagrant up"] = time.monotonic() - started
        return out

    def provision(self) -> Completed:
        """The Vagrantfile's "setup" provisioner (`make setup` as root)."""
        started = time.monotonic()
        out = self.vagrant("provision", "--provision-with", "setup")
        self.timings["provision (make setup)"] = time.monotonic() - started
        return out

    def ssh(self, command: str, timeout: float = 300) -> Completed:
        """`vagrant ssh -c COMMAND` (as the vagrant user), output merged."""
        return self.vagrant("ssh", "-c", command, timeout=timeout, check=False)

    def demo(self, sig: signal.Signals, command: str,
             until: Callable[[DemoRun], bool], timeout: float = 900,
             exit_timeout: float = 180) -> DemoRun:
        """Run `command` (in /vagrant, as root, in a session of its own whose
        id lands in DEMO_PIDFILE) through `vagrant ssh` with its output on a
        pipe; once `until(run)` holds, send `sig` to that session's process
        group (to the group, as a terminal's Ctrl-C does) and wait for the
        demo to end. Fails with the output so far when `until` does not hold
        in `timeout` seconds or the demo does not end in `exit_timeout`."""
        remote = (f"cd /vagrant && sudo setsid -w sh -c "
                  f"'echo $$ >{DEMO_PIDFILE}; exec {command}'")
        run = DemoRun()
        started = time.monotonic()
        proc = subprocess.Popen(self.argv("ssh", "-c", remote), cwd=ROOT / "vagrant",
                                env=self.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                run.lines.append((time.monotonic() - started, line))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = started + timeout
            while not until(run):
                if proc.poll() is not None:
                    reader.join(10)
                    raise AssertionError(f"the demo exited {proc.returncode} early:\n"
                                         f"{run.text[-6000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"the demo's output did not show what was expected "
                                         f"in {timeout:g}s:\n{run.text[-6000:]}")
                time.sleep(1)
            rows = [t for t, line in run.lines if " vm=" in line]
            run.seconds_to_first_row = rows[0] if rows else None
            sent = time.monotonic()
            kill = self.ssh(f"sudo kill -{sig.name[3:]} -- -$(cat {DEMO_PIDFILE})")
            if kill.rc != 0:
                raise AssertionError(f"signalling the demo failed: {kill.out}")
            try:
                run.rc = proc.wait(exit_timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the demo did not end {exit_timeout:g}s after "
                                     f"{sig.name}:\n{run.text[-6000:]}") from None
            run.seconds_to_exit_after_signal = time.monotonic() - sent
            run.seconds_total = time.monotonic() - started
            reader.join(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
            proc.stdout.close()
            self.ssh(f"sudo rm -f {DEMO_PIDFILE}")
        return run

    def _libvirt_tail(self) -> str:
        parts = []
        for path in sorted((self.hv.dir / "log").glob("qemu/*.log")):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError):
            log = (self.hv.dir / "log" / "libvirtd.log").read_text(errors="replace")
            parts.append(f"--- libvirtd.log\n{log[-2000:]}")
        return "\n".join(parts)


def sweep() -> None:
    """The dnsmasq of a killed run's management network: libvirtd's sweep
    (Libvirtd.open) stops the daemons and removes the kit, but the dnsmasq
    libvirt daemonized would outlive them."""
    for d in sorted(RUN_ROOT.glob("sghv*")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            owner = (d / "owner").read_text()
            if _proc_identity(int(owner.split()[0])) == owner:
                continue
        _kill_pidfiles(d / "run" / "network", "dnsmasq")


def have_tools() -> list[str]:
    """Host commands the kit needs that are missing (the box script installs
    vagrant and vagrant-libvirt; libvirt and QEMU come from hypervisor-setup.sh)."""
    return [t for t in ("ip", "libvirtd", "virtlogd", "qemu-system-x86_64")
            if shutil.which(t) is None]


def format_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())


def signal_name(sig: int) -> str:
    return signal.Signals(sig).name
