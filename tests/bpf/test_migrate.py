"""Pinned maps across an upgrade that changes one map's shape."""

from __future__ import annotations

import ctypes
import subprocess
import uuid
from pathlib import Path

from frames import syn4
from smtpguard.datapath.bpfsys import map_info
from smtpguard.datapath.loader import Datapath, Sizes, ensure_bpffs
from smtpguard.datapath.maps import SmtpConfig
from smtpguard.datapath.testrun import test_run as run_prog

SIZES = Sizes(max_stats=64, max_ifaces=8, conn_table=64, recent=64)


def test_a_map_of_an_old_shape_is_replaced_and_the_others_keep_their_counts() -> None:
    """smtp_config grew a field (the sketch's slot offset): a pin of the old
    8-byte shape is recreated, and the counters in the other pinned maps
    survive the upgrade (an agent restart never resets them)."""
    ensure_bpffs(Path("/sys/fs/bpf"))
    pin = Path(f"/sys/fs/bpf/smtpguard-test/mig-{uuid.uuid4().hex[:8]}")
    dp = Datapath(pin, SIZES)
    try:
        dp.load()
        dp.set_ports([25])
        assert run_prog(dp.ingress_fd, syn4(seq=1)).retval == -1
        dp.close()
        (pin / "smtp_config").unlink()
        subprocess.run(["bpftool", "map", "create", str(pin / "smtp_config"), "type", "array",
                        "key", "4", "value", "8", "entries", "1", "name", "smtp_config"],
                       check=True, capture_output=True)
        # Programs of that build are pinned: only the stale map makes it compile.
        dp = Datapath(pin, SIZES)
        dp.load()
        assert map_info(dp.table("smtp_config").fd).value_size == ctypes.sizeof(SmtpConfig)
        ((_, st),) = dp.table("smtp_stats").items()
        assert st.attempts == 1
        dp.set_no_answer(2.0)
        assert run_prog(dp.ingress_fd, syn4(seq=2)).retval == -1
        ((_, st),) = dp.table("smtp_stats").items()
        assert st.attempts == 2
        assert dp.table("smtp_config")[ctypes.c_uint32(0)].no_answer_ns == 2_000_000_000
    finally:
        dp.close()
        dp.unpin()
