"""The state database corrupted, read-only or full: the agent says so
(`store.failed`), keeps running on what it has in memory, and what is in the
kernel stays as it was: no crash loop, no dropped rule."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kit import lab_with_agent, require_root, send

POLICY = """
version: 1
classes:
  default: {port25: allow, limit: {rate: 600/minute, burst: 50}, thresholds: []}
"""


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "sgtest",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def corrupt(state: Path) -> None:
    db = state / "state.db"
    db.write_bytes(b"this is not a database" * 200)
    for side in ("state.db-wal", "state.db-shm"):
        (state / side).unlink(missing_ok=True)


def read_only(state: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)


def full(state: Path) -> None:
    subprocess.run(["dd", "if=/dev/zero", f"of={state / 'filler'}", "bs=4k"],
                   capture_output=True, check=False)  # until the disk is full


@pytest.mark.parametrize("fault", [corrupt, read_only, full], ids=lambda f: f.__name__)
def test_store_fault_is_reported_and_changes_nothing_in_the_kernel(tmp_path: Path,
                                                                    fault: object) -> None:
    require_root()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with lab_with_agent(tmp_path, 1, policy, routed=1, enforce=True, start=False) as (
            lab, agent), tmpfs(agent.state_dir, "1m"):
        agent.start()
        agent.ctl("block", "rvm1", "--for", "1h", "--reason", "before the fault")
        agent.stop()
        assert callable(fault)
        fault(agent.state_dir)
        agent.start()
        if fault is full:  # opening still works; the next write cannot
            agent.ctl("block", "vm1", "--for", "1h", "--reason", "after the fault")
        ev = agent.wait_event("store.failed", timeout=15)
        print(f"\n{fault.__name__}: {ev['error']}")
        time.sleep(3)  # no crash loop: still running
        assert agent.proc is not None and agent.proc.poll() is None
        assert send(lab, "rvm1", 2, port=25, timeout=2) == {"refused": 2}  # still blocked
        # Decisions still reach the kernel, held in memory.
        agent.ctl("block", "vm1", "--for", "1h", "--reason", "during the fault")
        assert "completed" not in send(lab, "vm1", 1, port=25, timeout=2)
        rows = {r["vm"]: r for r in agent.ctl("status", "--json")}  # type: ignore[union-attr]
        assert rows["vm1"]["state"] == "blocked"
