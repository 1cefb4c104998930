"""BPF_PROG_TEST_RUN: run a loaded program on a crafted frame (tests, bench)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from smtpguard.datapath.bpfsys import PROG_TEST_RUN, bpf


class _TestAttr(ctypes.Structure):
    # The test member of union bpf_attr (uapi/linux/bpf.h).
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RunResult:
    retval: int
    duration_ns: int  # mean per run, as the kernel measured it


def test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> RunResult:
    """Run the program over frame `repeat` times in the kernel."""
    buf_in = ctypes.create_string_buffer(frame, len(frame))
    buf_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = _TestAttr(
        prog_fd=prog_fd, data_size_in=len(frame), data_size_out=len(buf_out),
        data_in=ctypes.addressof(buf_in), data_out=ctypes.addressof(buf_out),
        repeat=repeat,
    )
    bpf(PROG_TEST_RUN, attr)
    return RunResult(ctypes.c_int32(attr.retval).value, attr.duration)
