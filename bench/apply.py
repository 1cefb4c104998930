"""Enforcement apply cost with 1,000 VMs, nftables and iptables side by side.

Each backend runs in a scratch network namespace of its own (so no legacy
iptables table ever lands in the host's): a full apply onto an empty table,
the same apply again onto what is there (a restart adopting its rules), one
VM's block and release (p50 / p99 over TRIALS), and one read of the
blocked-attempt counters.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from smtpguard.enforce.desired import Action, Desired
from smtpguard.enforce.nftables import in_scratch_netns
from smtpguard.policy import Policy

N = 1000
TRIALS = 20


def _ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def measure(make: Callable[[], Any]) -> dict[str, float]:
    classes = {f"vnet{i}": "default" for i in range(N)}
    desired = Desired(Policy(), classes)

    def run() -> dict[str, float]:
        enf = make()
        out = {"full": _ms(lambda: enf.apply(desired))}
        out["again"] = _ms(lambda: make().apply(desired))
        times = []
        for i in range(TRIALS):
            name = [f"vnet{i * 7}"]
            until = time.time() + 3600
            times.append(_ms(lambda n=name, u=until: enf.set_action(
                n, Action("block", u), classes)))
            times.append(_ms(lambda n=name: enf.set_action(n, None, classes)))
        times.sort()
        out["one_p50"] = statistics.median(times)
        out["one_p99"] = times[min(len(times) - 1, int(len(times) * 0.99))]
        out["counts"] = _ms(enf.blocked_counts)
        return out

    return in_scratch_netns(run)


def run() -> list[tuple[str, float, str]]:
    from smtpguard.enforce.iptables import IptablesEnforcer
    from smtpguard.enforce.nftables import NftablesEnforcer

    nft = measure(NftablesEnforcer)
    ipt = measure(IptablesEnforcer)
    rows = []
    for key, what in (("full", "full apply"), ("again", "re-apply onto itself (restart)"),
                      ("one_p50", "one VM block/release p50"),
                      ("one_p99", "one VM block/release p99"),
                      ("counts", "read blocked-attempt counters")):
        rows.append((f"{what}, {N} VMs, nftables", nft[key], "ms"))
        rows.append((f"{what}, {N} VMs, iptables-legacy", ipt[key],
                     f"ms ({ipt[key] / nft[key]:.1f}x nftables)"))
    return rows


if __name__ == "__main__":
    for name, value, unit in run():
        print(f"{name:<60} {value:>9.1f}  {unit}")
