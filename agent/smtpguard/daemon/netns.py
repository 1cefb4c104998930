"""Entering named network namespaces (the lab, and agents run inside one)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from smtpguard.errors import LabError

T = TypeVar("T")


def enter(name: str) -> None:
    """Move the calling thread (the process, if called before any thread
    starts) into the named network namespace. Mounts are untouched, so the
    host's bpffs stays visible, unlike with `ip netns exec`."""
    from pyroute2 import netns

    try:
        netns.setns(name)
    except OSError as exc:
        raise LabError(f"entering network namespace {name}: {exc.strerror}") from exc


def run_in(name: str, fn: Callable[[], T]) -> T:
    """Call fn in a fresh thread inside the namespace and return its result."""
    box: dict[str, T] = {}
    err: list[BaseException] = []

    def target() -> None:
        try:
            enter(name)
            box["r"] = fn()
        except BaseException as exc:  # handed back to the caller
            err.append(exc)

    t = threading.Thread(target=target, name=f"netns-{name}")
    t.start()
    t.join()
    if err:
        raise err[0]
    return box["r"]
