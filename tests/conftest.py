"""Shared test policy: privileged tiers run whenever we are root, and under
CI=true a privileged test may never skip (a missing capability fails)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PRIVILEGED_DIRS = ("bpf", "integration", "reliability", "system")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        rel = Path(str(item.fspath)).relative_to(ROOT / "tests")
        if rel.parts[0] in PRIVILEGED_DIRS:
            item.add_marker(pytest.mark.privileged)


@pytest.fixture(autouse=True)
def _privileged_gate(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("privileged") is None or os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("privileged test needs root, and CI=true forbids skipping it")
    pytest.skip("needs root (BPF, namespaces)")
