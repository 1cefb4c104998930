"""The iptables backend's counts: rejected attempts per (family, reason,
interface, port), summed from the packet counters of our REJECT rules (read
by position, no parsing); and how full the per-source hashlimit of
interfaces not seen yet is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smtpguard.enforce import iptables_render as R
from smtpguard.enforce.counts import BlockedCount
from smtpguard.enforce.iptc_table import Model, XtTable
from smtpguard.policy.model import Policy

HASHLIMIT_PROC = {"ipv4": "ipt_hashlimit", "ipv6": "ip6t_hashlimit"}


def rejected(table: Callable[[R.Family], XtTable], model: dict[str, Model]
             ) -> list[BlockedCount]:
    """The counts of the chains in model (what they hold, rule by rule);
    table: a family's filter table, to read the counters from."""
    sums: dict[tuple[str, str, str, int], int] = {}
    for fam in R.FAMILIES:
        ft = table(fam)
        for chain, comments in model[fam].items():
            owner = R.owner_of(chain)  # none: the tally's rules say whose
            if owner is None and chain != R.TALLY_CHAIN:
                continue
            counters = ft.counters(chain) if ft.is_chain(chain) else []
            if len(counters) != len(comments):
                continue  # drifted: the repair pass rebuilds it
            for comment, (packets, _bytes) in zip(comments, counters, strict=True):
                if not packets:  # nothing rejected: no count (as nftables has none)
                    continue
                parsed = R.parse_comment(comment)
                if not parsed:
                    continue
                ifname, tag = (owner, parsed[0]) if owner is not None else \
                    (R.parse_tally(parsed[0]) or ("", ""))
                what = R.counted(tag)
                if what and ifname:  # a tag's rules (routed, bridged) add up
                    key = (fam, what[0], ifname, what[1])
                    sums[key] = sums.get(key, 0) + packets
    return [BlockedCount(*k, n) for k, n in sums.items()]


def hashlimit_fill(proc: Path, policy: Policy | None
                   ) -> dict[tuple[str, str], tuple[int, int]]:
    """(family, "hashlimit_unknown") -> (entries, most) of the default class's
    per-source limiter (proc: the namespace's net directory in /proc)."""
    fill: dict[tuple[str, str], tuple[int, int]] = {}
    lim = R.default_limit(policy) if policy is not None else None
    if lim is not None:
        for fam in R.FAMILIES:
            path = proc / HASHLIMIT_PROC[fam] / lim.name
            if path.exists():
                fill[(fam, "hashlimit_unknown")] = (
                    len(path.read_text().splitlines()), lim.max)
    return fill
