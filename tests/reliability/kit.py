"""Shared by the reliability suite: the lab helpers of tests/integration, and
how long the suite runs (SMTPGUARD_RELIABILITY=full: `make test-reliability`;
otherwise a short version, part of `make test`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# tests/integration's conftest, under a name of its own (tests/conftest.py is
# the `conftest` module here).
_spec = importlib.util.spec_from_file_location(
    "lab_conftest", Path(__file__).resolve().parents[1] / "integration" / "conftest.py")
assert _spec is not None and _spec.loader is not None
lab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab)
AgentProc = lab.AgentProc
lab_with_agent = lab.lab_with_agent
our_filters = lab.our_filters
require_root = lab.require_root
send = lab.send

FULL = os.environ.get("SMTPGUARD_RELIABILITY") == "full"


def scale(full: int, short: int) -> int:
    return full if FULL else short


__all__ = ["AgentProc", "FULL", "lab_with_agent", "our_filters", "require_root", "scale",
           "send"]
