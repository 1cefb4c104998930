"""smtpguard benchmarks: every comparison measured side by side in one run.

    make bench            (root; prints a table, writes bench/results/bench.json)

1. Classifier cost per packet by BPF_PROG_TEST_RUN, against an empty tc
   program measured the same way in the same run.
2. Start-up: compiling with bcc vs reusing the pinned build, and the agent's
   resident memory vs a process that compiled with bcc in-process.
3. Agent CPU per /metrics scrape with 1,000 VM interfaces (bench/scrape.py).
4. Reaction time from a fanout's 100th destination to the block (bench/reaction.py).
5. Enforcement apply with 1,000 VMs, nftables vs iptables-legacy (bench/apply.py).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import frames as f  # noqa: E402
from smtpguard.datapath.loader import Datapath, Sizes, ensure_bpffs  # noqa: E402
from smtpguard.datapath.testrun import test_run  # noqa: E402

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


def startup(rows: list[tuple[str, float, str]]) -> None:
    pin = Path(f"/sys/fs/bpf/smtpguard-bench/{uuid.uuid4().hex[:8]}")
    try:
        t0 = time.monotonic()
        dp = Datapath(pin)
        dp.load()
        cold = time.monotonic() - t0
        dp.close()
        t0 = time.monotonic()
        dp = Datapath(pin)
        dp.load()
        warm = time.monotonic() - t0
        dp.close()
        rows.append(("load: compile in child + pin", cold * 1000, "ms"))
        rows.append(("load: reuse pinned build", warm * 1000, f"ms ({cold / warm:.0f}x faster)"))
    finally:
        shutil.rmtree(pin, ignore_errors=True)
    probe = ("import sys; sys.path[:0]=[%r]; from smtpguard.datapath.loader import Datapath; "
             "from pathlib import Path; import shutil; p=Path(%r); d=Datapath(p); d.load(); "
             "print(open('/proc/self/status').read()); shutil.rmtree(p)")
    inproc = ("from bcc import BPF; from smtpguard.datapath import compile as c; "
              "from smtpguard.datapath.loader import default_bpf_dir as d; from pathlib import "
              "Path; import shutil; p=Path(%r); p.mkdir(parents=True); "
              "b=c.load(d(), c.cflags(d(), p, 32768, 4096, 262144)); "
              "print(open('/proc/self/status').read()); shutil.rmtree(p)")

    def measure(code: str) -> float:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
        return next(int(ln.split()[1]) / 1024 for ln in out.splitlines()
                    if ln.startswith("VmRSS"))

    path = f"/sys/fs/bpf/smtpguard-bench/{uuid.uuid4().hex[:8]}"
    agent_like = measure(probe % (str(ROOT / "agent"), path))
    bcc_in = measure(inproc % f"/sys/fs/bpf/smtpguard-bench/{uuid.uuid4().hex[:8]}")
    rows.append(("RSS after load, bcc in-process", bcc_in, "MB"))
    rows.append(("RSS after load, as the agent does", agent_like,
                 f"MB ({agent_like / bcc_in:.2f} of in-process)"))


def main() -> int:
    ensure_bpffs(Path("/sys/fs/bpf"))
    rows: list[tuple[str, float, str]] = []
    bpf_cost(rows)
    startup(rows)
    import apply
    import reaction
    import scrape

    rows += scrape.run()
    rows += reaction.run()
    rows += apply.run()
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'value':>9}  unit")
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:>9.1f}  {unit}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "bench.json").write_text(json.dumps(
        [{"benchmark": n, "value": round(v, 2), "unit": u} for n, v, u in rows], indent=2))
    print(f"\nwritten to {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
