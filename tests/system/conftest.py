"""The system tier: smtpguard as an operator runs it, under systemd as PID 1
on Debian 12's own kernel, in a machine booted with QEMU (see machine.py).

One machine per test module; tests in a module run in order on it, as an
operator's session would. The steps' timings are printed at the end of the
run, and written to $SMTPGUARD_TEST_TIMINGS (JSON lines) when it is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import package  # noqa: E402
from machine import CACHE, NOTES, PREFIX, ROOT, TIMINGS, Machine, checkout_disk, timing  # noqa: E402

_OUTCOME = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def image() -> Path:
    if os.geteuid() != 0:
        pytest.fail("the system tier needs root (QEMU, mke2fs -d, mmdebstrap)")
    t0 = time.monotonic()
    out = subprocess.run([str(ROOT / "scripts/system-image.sh")], check=True,
                         capture_output=True, text=True)
    timing("image (built or found in the cache)", time.monotonic() - t0)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def debs() -> Iterator[Path]:
    """This checkout's Debian package (`make deb`, lintian included) and the
    build an upgrade starts from (package.py), in one directory."""
    out = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-debs-"))
    try:
        t0 = time.monotonic()
        deb = package.build(out)
        timing("make deb (dpkg-buildpackage and lintian, on the host)", time.monotonic() - t0)
        package.lowered(deb, out)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def machine(image: Path, request: pytest.FixtureRequest) -> Iterator[Machine]:
    """The machine; with the Debian packages on its checkout disk (/mnt/src/debs)
    when the test module sets PACKAGES = True."""
    debs = request.getfixturevalue("debs") if getattr(request.module, "PACKAGES", False) else None
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    try:
        t0 = time.monotonic()
        src = checkout_disk(CACHE / "wheels", work / "src.img", debs)
        timing("checkout disk", time.monotonic() - t0)
        with Machine.boot(image, work, src) as m:
            timing(f"boot to the guest agent ({m.accel})", m.boot_seconds)
            m.sh("mkdir -p /mnt/src && mount -o ro /dev/vdb /mnt/src")
            yield m
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report.failed
    return report


@pytest.fixture(autouse=True)
def _diagnostics(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test on the machine fails, the service's state and journal
    tail go into the report (CI keeps nothing else of the machine), with
    the output of the test module's DIAGNOSTICS shell commands, if any."""
    yield
    if not request.node.stash.get(_OUTCOME, False) or "machine" not in request.fixturenames:
        return
    m: Machine = request.getfixturevalue("machine")
    extra = getattr(request.module, "DIAGNOSTICS", "")
    try:
        r = m.sh("systemctl status smtpguard --no-pager -n 0; "
                 "journalctl -u smtpguard -o cat --no-pager -n 60"
                 + (f"; echo --- diagnostics; {extra}" if extra else ""),
                 timeout=60, check=False)
        print(f"--- the machine's smtpguard.service ---\n{r.out}{r.err}")
    except Exception as exc:  # the machine may be what failed
        print(f"--- no diagnostics from the machine: {exc}; console:\n{m.console_tail()}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TIMINGS and not NOTES:
        return
    terminalreporter.section("system tier: measured steps")
    for what, seconds in TIMINGS:
        terminalreporter.write_line(f"{seconds:8.1f} s  {what}")
    for text in NOTES:
        terminalreporter.write_line(text)
