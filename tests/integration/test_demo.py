"""`make run`'s demo (smtpguard lab demo) ends cleanly however its user goes
away: a closed terminal (SIGHUP), a pipe whose reader is gone, Ctrl-C on a
piped run. Nothing of the lab may stay behind: namespaces, the SMTP sink,
pins. On a terminal the table is redrawn in place; into a pipe, plain lines."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import shutil
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SG, require_root, unique
from smtpguard.lab import topology


def sink_pid(lab: topology.Lab, timeout: float = 60) -> int:
    path = lab.state_dir / "sink.pid"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the demo built no sink"
        time.sleep(0.1)
    return int(path.read_text())


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def assert_cleaned_up(lab: topology.Lab, sink: int, demo: subprocess.Popen[bytes]) -> None:
    assert demo.wait(90) == 0
    assert lab.namespaces() == []
    assert not alive(sink)
    assert not Path(f"/sys/fs/bpf/smtpguard/{lab.prefix}").exists()


DEMOS: list[subprocess.Popen[bytes]] = []


def start(lab: topology.Lab, **kw: object) -> subprocess.Popen[bytes]:
    demo = subprocess.Popen([*SG, "lab", "demo", "--name", lab.prefix], **kw)  # type: ignore[call-overload]
    DEMOS.append(demo)
    return demo


@pytest.fixture
def lab() -> Iterator[topology.Lab]:
    """A lab prefix for one demo; whatever a failed test leaves is removed
    (and its demo reaped)."""
    require_root()
    lab = topology.Lab(unique("sgd"))
    try:
        yield lab
    finally:
        while DEMOS:
            demo = DEMOS.pop()
            if demo.poll() is None:
                demo.kill()
            demo.wait()
            if demo.stdout is not None:
                demo.stdout.close()
        for pid in _pids_of(lab.prefix):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        topology.down(lab)
        shutil.rmtree(f"/sys/fs/bpf/smtpguard/{lab.prefix}", ignore_errors=True)


def _pids_of(prefix: str) -> list[int]:
    """Demo processes (and their agents) started for this lab."""
    out = []
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if p.name.isdigit() and prefix.encode() in (p / "cmdline").read_bytes():
                out.append(int(p.name))
    return out


def read_until(fd: int, want: bytes, seen: bytearray, timeout: float = 90,
               count: int = 1) -> None:
    """Read fd into seen until want occurs count times."""
    deadline = time.monotonic() + timeout
    while seen.count(want) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"no {want!r} in {bytes(seen[-2000:])!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the other side closed
                chunk = b""
            assert chunk, f"output ended before {want!r}: {bytes(seen[-2000:])!r}"
            seen += chunk


def test_a_closed_terminal_cleans_up_and_the_table_redraws_in_place(
        lab: topology.Lab) -> None:
    """On a terminal the demo draws on the alternate screen, each refresh from
    the top (cursor home, lines cleared to their end), never a full clear that
    terminals push into the scrollback. Closing the terminal (the kernel's
    SIGHUP to its session) removes the whole lab."""
    master, slave = pty.openpty()

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    demo = start(lab, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                 preexec_fn=controlling_tty)
    os.close(slave)
    try:
        sink = sink_pid(lab)
        seen = bytearray()
        read_until(master, b"\x1b[?1049h", seen)
        frames = seen[seen.index(b"\x1b[?1049h"):]
        read_until(master, b"ATTEMPTS  ", frames, count=2)  # two whole frames
        read_until(master, b"ROLE", frames, count=2)
        assert frames.count(b"\x1b[H") >= 2
        assert b"\x1b[2J" not in frames
        assert b"ATTEMPTS" in frames and b"vm2" in frames
        assert frames.count(b"ATTEMPTS  ") >= 2  # two frames, each drawn whole
    finally:
        os.close(master)  # the terminal goes away
    assert_cleaned_up(lab, sink, demo)


def test_a_closed_pipe_cleans_up(lab: topology.Lab) -> None:
    """Output into a pipe is plain lines (no escape codes); when the reader
    goes away the next refresh fails with EPIPE, and the demo cleans up."""
    demo = start(lab, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                 stdin=subprocess.DEVNULL)
    assert demo.stdout is not None
    try:
        sink = sink_pid(lab)
        seen = bytearray()
        read_until(demo.stdout.fileno(), b"vm=vm2 attempts=", seen)
        assert b"\x1b" not in seen
    finally:
        demo.stdout.close()
    assert_cleaned_up(lab, sink, demo)


def test_ctrl_c_on_a_piped_run_cleans_up(lab: topology.Lab) -> None:
    """`make run | tee log`, then Ctrl-C: the terminal's SIGINT reaches the
    whole pipeline, tee dies first and the demo's writes fail; the lab still
    goes."""
    demo = start(lab, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                 stdin=subprocess.DEVNULL, start_new_session=True)
    assert demo.stdout is not None
    try:
        sink = sink_pid(lab)
        read_until(demo.stdout.fileno(), b"vm=vm1 attempts=", bytearray())
    finally:
        demo.stdout.close()  # tee is gone
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGINT)
    assert_cleaned_up(lab, sink, demo)
