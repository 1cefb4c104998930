"""The system tier's machine: the image scripts/system-image.sh builds (Debian
12, systemd as PID 1, Debian's own kernel and headers), booted in QEMU.

    with Machine.boot(image_dir, checkout_disk) as m:
        m.sh("systemctl is-system-running --wait")

The image is never written: the machine runs on a qcow2 overlay, so every
boot starts from the same fresh system. The checkout (and the wheelhouse for
its pip) reach it on a second, read-only disk, mounted at /mnt/src. No
network device: the guest agent (virtio-serial) is the only way in or out.
TCG unless SMTPGUARD_TEST_ACCEL=kvm (nested KVM hangs on these machines).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from qga import GuestAgent, Result

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "sgsys"
CACHE = Path(os.environ.get("SMTPGUARD_TEST_CACHE", "/var/cache/smtpguard-test")) / "system"


TIMINGS: list[tuple[str, float]] = []  # printed at the end of the run (conftest)
NOTES: list[str] = []  # figures that are not times, printed with them


def timing(what: str, seconds: float) -> None:
    """Record a measured step; also to $SMTPGUARD_TEST_TIMINGS (JSON lines)."""
    TIMINGS.append((what, seconds))
    out = os.environ.get("SMTPGUARD_TEST_TIMINGS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"what": what, "seconds": round(seconds, 1)}) + "\n")


def note(text: str) -> None:
    NOTES.append(text)


def checkout_disk(wheels: Path, out: Path, debs: Path | None = None) -> Path:
    """An ext4 image of this checkout's files (tracked and untracked, not
    ignored: what a clone plus the work in progress holds), the wheelhouse,
    and the Debian packages in debs/ when given."""
    staging = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-src-"))
    try:
        files = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"], capture_output=True, check=True).stdout.split(b"\0")
        dest = staging / "smtpguard"
        for rel in filter(None, files):
            src = ROOT / os.fsdecode(rel)
            if not src.is_file():  # deleted in the work tree
                continue
            target = dest / os.fsdecode(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        shutil.copytree(wheels, staging / "wheels")
        if debs is not None:
            shutil.copytree(debs, staging / "debs")
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", "smtpguard-src", "-d",
                        str(staging), str(out), "1G"], check=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


class Machine:
    def __init__(self, image: Path, workdir: Path, src_disk: Path,
                 memory_mib: int = 3072, cpus: int = 2) -> None:
        self.image = image
        self.workdir = workdir
        self.src_disk = src_disk
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.console = workdir / "console.log"
        self.qga = GuestAgent(str(workdir / "qga.sock"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.accel = os.environ.get("SMTPGUARD_TEST_ACCEL", "tcg")
        self.boot_seconds = 0.0

    @classmethod
    @contextlib.contextmanager
    def boot(cls, image: Path, workdir: Path, src_disk: Path,
             timeout: float = 300) -> Iterator[Machine]:
        m = cls(image, workdir, src_disk)
        try:
            m.start(timeout)
            yield m
        finally:
            m.stop()

    def start(self, timeout: float) -> None:
        overlay = self.workdir / "root.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(self.image / "root.img"), str(overlay)], check=True)
        cmdline = ("root=/dev/vda rw console=ttyS0 panic=-1 quiet "
                   "systemd.show_status=0 net.ifnames=0")
        argv = [
            "qemu-system-x86_64", "-name", f"{PREFIX}-{os.getpid()}",
            "-machine", f"q35,accel={self.accel}", "-cpu", "max" if self.accel == "tcg" else "host",
            "-m", str(self.memory_mib), "-smp", str(self.cpus),
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
            "-append", cmdline,
            "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
            "-drive", f"file={self.src_disk},if=virtio,format=raw,readonly=on",
            "-chardev", f"socket,id=qga0,path={self.qga.path},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-nic", "none", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.console}", "-monitor", "none",
        ]
        t0 = time.monotonic()
        with open(self.workdir / "qemu.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = t0 + timeout
        while not Path(self.qga.path).exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {self._stderr()}")
            time.sleep(0.1)
        try:
            self.qga.connect(deadline - time.monotonic())
        except Exception as exc:
            raise RuntimeError(f"the guest did not come up; console:\n{self.console_tail()}"
                               ) from exc
        self.boot_seconds = time.monotonic() - t0

    def _stderr(self) -> str:
        try:
            return (self.workdir / "qemu.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console output)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        self.qga.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    # -- running things in the guest ----------------------------------------
    def run(self, argv: list[str], timeout: float = 300) -> Result:
        return self.qga.run(argv, timeout)

    def sh(self, script: str, timeout: float = 300, check: bool = True) -> Result:
        r = self.qga.sh(script, timeout)
        return r.check(script) if check else r

    def timed(self, script: str, timeout: float = 300) -> tuple[Result, float]:
        t0 = time.monotonic()
        r = self.sh(script, timeout)
        return r, time.monotonic() - t0

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.qga.run(["/bin/sh", "-c", f"umask 022; cat >{path} && chmod {mode} {path}"],
                     stdin=text).check(f"writing {path}")
