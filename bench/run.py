"""smtpguard benchmarks: every comparison measured side by side in one run.

    make bench                       all of them (root; ~7 min on 2 cores)
    make bench BENCH="reaction bpf"  some of them

Prints one table (value, the baseline measured beside it, the target from
the benchmarks issue, a verdict) and writes bench/results/bench.json.

1. throughput.py  non-SMTP throughput between two lab VMs: no agent, the
                  agent with 1,000 VMs' policy, a naive 1,000-rule chain
2. (here)         classifier cost per packet by BPF_PROG_TEST_RUN, against
                  an empty tc program measured the same way
3. counting.py    attempts counted / offered at this machine's top SYN rate
4. ceiling.py     accepted / configured at 10x overload, three ceilings
5. reaction.py    threshold crossed -> next attempt stopped, 100 trials
6. footprint.py   start-up to ready (100 interfaces), RSS (1,000)
7. apply.py       policy apply with 1,000 VMs, nftables and iptables-legacy
8. footprint.py, scrape.py  agent CPU at idle and per /metrics scrape
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import frames as f  # noqa: E402
from smtpguard.datapath.loader import Datapath, Sizes, ensure_bpffs  # noqa: E402
from smtpguard.datapath.testrun import test_run  # noqa: E402
from table import Row, machine, render, write_json  # noqa: E402

EMPTY = b"""
#include <uapi/linux/pkt_cls.h>
int empty(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
"""
REPEAT = 200_000
CALLS = 20_000


def looped(fd: int, frame: bytes) -> float:
    """ns per run over REPEAT runs in the kernel (best of 5)."""
    return min(test_run(fd, frame, REPEAT).duration_ns for _ in range(5))


def one_by_one(fd: int, frames: list[bytes]) -> float:
    """Median ns of single runs (each a distinct frame)."""
    return statistics.median(test_run(fd, fr, 1).duration_ns for fr in frames)


def syns(n: int, start: int) -> list[bytes]:
    return [f.syn4(sport=10000 + i % 50000, seq=start + i, dst=f"198.19.{i % 200}.1")
            for i in range(n)]


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def bpf_cost(rows: list[tuple[str, float, str]]) -> None:
    from bcc import BPF

    empty = BPF(text=EMPTY).load_func(b"empty", BPF.SCHED_CLS)
    pin = Path(f"/sys/fs/bpf/smtpguard-bench/{uuid.uuid4().hex[:8]}")
    dp = Datapath(pin, Sizes(conn_table=65536))
    try:
        dp.load()
        dp.set_ports([25, 465, 587, 2525])
        non_smtp = f.eth(f.ipv4("198.18.0.11", "198.19.0.1", f.tcp(40000, 443, f.ACK,
                                                                  payload=b"x" * 64)), f.ETH_P_IP)
        udp = f.eth(f.ipv4("198.18.0.11", "198.19.0.1", b"\0" * 28, proto=f.UDP), f.ETH_P_IP)
        base_loop = looped(empty.fd, non_smtp)
        base_one = one_by_one(empty.fd, syns(CALLS, 0))
        rows.append(("empty tc program, looped", base_loop, "ns/packet"))
        for name, frame in (("non-SMTP TCP", non_smtp), ("non-SMTP UDP", udp)):
            v = looped(dp.ingress_fd, frame)
            rows.append((f"{name}, looped", v, f"ns/packet (+{v - base_loop:.1f} vs empty)"))
        syn = f.syn4(seq=1)
        test_run(dp.ingress_fd, syn)
        v = looped(dp.ingress_fd, syn)
        rows.append(("repeated SYN, looped", v, f"ns/packet (+{v - base_loop:.1f} vs empty)"))
        rows.append(("empty tc program, single runs", base_one, "ns/packet"))
        v = one_by_one(dp.ingress_fd, syns(CALLS, 1000))
        rows.append(("new SYN, single runs", v, f"ns/packet (+{v - base_one:.1f} vs empty)"))
        for fr in syns(70_000, 10**6):  # overfill the 65,536-entry dedup LRU
            test_run(dp.ingress_fd, fr)
        v = one_by_one(dp.ingress_fd, syns(CALLS, 10**7))
        rows.append(("new SYN, dedup table full", v, f"ns/packet (+{v - base_one:.1f} vs empty)"))
    finally:
        dp.close()
        shutil.rmtree(pin, ignore_errors=True)


def bpf_rows() -> list[Row]:
    raw: list[tuple[str, float, str]] = []
    bpf_cost(raw)
    return [Row("2 BPF cost", n, v, u) for n, v, u in raw]


def sections() -> dict[str, Callable[[], list[Row]]]:
    import apply
    import ceiling
    import counting
    import footprint
    import reaction
    import scrape
    import throughput

    return {"throughput": throughput.run, "bpf": bpf_rows, "counting": counting.run,
            "ceiling": ceiling.run, "reaction": reaction.run, "footprint": footprint.run,
            "apply": apply.run, "scrape": scrape.run}


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
