"""The real-hypervisor tier: root, Debian's libvirt and QEMU, guests whose own
kernels send SMTP. Its tests are `privileged` (tests/conftest.py: they run as
root and, under CI=true, never skip) and `hypervisor` (select or deselect the
tier with -m). scripts/hypervisor-setup.sh installs what the tier needs; the
session runs it once (quiet and quick when nothing is missing)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from libvirtd import Libvirtd  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hypervisor: real libvirtd and QEMU guests (root; never skipped under CI)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.privileged)
            item.add_marker(pytest.mark.hypervisor)


@pytest.fixture(scope="session")
def hypervisor_setup() -> None:
    """Root, and the tier's packages and guest kernel (module and session
    fixtures run before tests/conftest.py's per-test gate: same rule here)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("hypervisor test needs root, and CI=true forbids skipping it")
        pytest.skip("needs root (libvirtd, QEMU, namespaces)")
    out = subprocess.run([str(ROOT / "scripts" / "hypervisor-setup.sh")],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"scripts/hypervisor-setup.sh failed:\n{out.stderr}")


@pytest.fixture(scope="module")
def hv(hypervisor_setup: None) -> Iterator[Libvirtd]:
    """A private libvirtd with its network and sink, shared by a module's tests."""
    with Libvirtd() as kit:
        yield kit
