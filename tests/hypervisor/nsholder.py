"""The kit's daemon parent, run inside the daemons' namespaces (libvirtd.py
starts it there): it holds the mount namespace, starts and stops libvirtd and
virtlogd on request, and is their child subreaper, so the QEMU processes
libvirtd daemonizes are reaped the moment they exit (this machine's PID 1
reaps late, and libvirt's destroy waits until its QEMU is reaped).

Lines on stdin, one answer line each on stdout:
    start NAME OUTFILE ARGV...   ->  pid N
    stop NAME TIMEOUT            ->  stopped RC      (SIGTERM, then SIGKILL)
    pid NAME                     ->  pid N | pid -
At end of input (the test process is gone) it kills what it started, and
the QEMU processes it adopted, then exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36


def reap(exited: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exited[pid] = os.waitstatus_to_exitcode(status)


def alive(pid: int, exited: dict[int, int]) -> bool:
    reap(exited)
    return pid not in exited


def spawn(argv: list[str], output: str) -> int:
    """argv in a session of its own, output appended to a file. Not
    subprocess.Popen: its bookkeeping would reap children behind reap()."""
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawnp(argv[0], argv, os.environ, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)])
    finally:
        os.close(fd)


def stop(pid: int, timeout: float, exited: dict[int, int]) -> int:
    if not alive(pid, exited):
        return exited.pop(pid)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid, exited):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.02)
    return exited.pop(pid)


def main() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    started: dict[str, int] = {}
    exited: dict[int, int] = {}
    print("ready", flush=True)
    buf = b""
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], 0.05)
        reap(exited)
        if not ready:
            continue
        chunk = os.read(sys.stdin.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd, name, *rest = line.decode().split()
            if cmd == "start":
                pid = started[name] = spawn(rest[1:], rest[0])
                exited.pop(pid, None)  # an earlier process's, if the pid came round again
                answer = f"pid {pid}"
            elif cmd == "stop":
                pid = started.pop(name, 0)
                answer = f"stopped {stop(pid, float(rest[0]), exited) if pid else '-'}"
            else:
                pid = started.get(name, 0)
                answer = f"pid {pid if pid and alive(pid, exited) else '-'}"
            print(answer, flush=True)
    for pid in started.values():
        if alive(pid, exited):
            stop(pid, 10, exited)
    # Whatever is left is ours by adoption (QEMU): kill it and reap it.
    for pid in children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while children():
        reap(exited)
        time.sleep(0.02)


def children() -> list[int]:
    me = os.getpid()
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == me:
            out.append(int(pid))
    return out


if __name__ == "__main__":
    main()
