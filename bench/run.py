"""smtpguard benchmarks: every comparison measured side by side in one run.

    make bench                       all of them (root; ~7 min on 2 cores)
    make bench BENCH="reaction bpf"  some of them

Prints one table (value, the baseline measured beside it, the target from
the benchmarks issue, a verdict) and writes bench/results/bench.json.

1. throughput.py  non-SMTP throughput between two lab VMs: no agent, the
                  agent with 1,000 VMs' policy, a naive 1,000-rule chain
2. bpfcost.py     classifier cost per packet by BPF_PROG_TEST_RUN, against
                  an empty tc program measured the same way
3. counting.py    attempts counted / offered at this machine's top SYN rate
4. ceiling.py     accepted / configured at 10x overload, three ceilings
5. reaction.py    threshold crossed -> next attempt stopped, 100 trials
6. footprint.py   start-up to ready (100 interfaces), RSS (1,000)
7. apply.py       policy apply with 1,000 VMs, nftables and iptables-legacy
8. footprint.py, scrape.py  agent CPU at idle and per /metrics scrape
10. placement.py  where the enforcement hooks: bridge and inet tables, a
                  netdev table on each VM device's ingress, smtp-gate's
                  chain, and the empty hooks of each kind, per packet
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from smtpguard.datapath.loader import ensure_bpffs
from table import Row, machine, render, write_json

ROOT = Path(__file__).resolve().parents[1]


def sections() -> dict[str, Callable[[], list[Row]]]:
    import apply
    import bpfcost
    import ceiling
    import counting
    import fleet
    import footprint
    import placement
    import reaction
    import scrape
    import throughput

    return {"throughput": throughput.run, "bpf": bpfcost.run, "counting": counting.run,
            "ceiling": ceiling.run, "reaction": reaction.run, "footprint": footprint.run,
            "apply": apply.run, "scrape": scrape.run, "fleet": fleet.run,
            "placement": placement.run}


def main(argv: list[str]) -> int:
    """make bench [BENCH="reaction apply"]: all benchmarks, or the named ones."""
    ensure_bpffs(Path("/sys/fs/bpf"))
    known = sections()
    chosen = argv or list(known)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        print(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    rows: list[Row] = []
    for name in chosen:
        t = time.monotonic()
        rows += known[name]()
        print(f"bench: {name} done in {time.monotonic() - t:.0f} s", file=sys.stderr)
    rows.sort(key=lambda r: r.section.split()[0])  # stable: each module's order stays
    seconds = time.monotonic() - t0
    m = machine()
    print(f"\nsmtpguard benchmarks, {m['cpus']} x {m['cpu']}, kernel {m['kernel']}, "
          f"{seconds / 60:.1f} min\n")
    print(render(rows))
    out = ROOT / "bench" / "results" / "bench.json"
    write_json(rows, out, seconds)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
