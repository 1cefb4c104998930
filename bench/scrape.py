"""Agent CPU per /metrics scrape on a host with 1,000 VM interfaces.

Real maps and real nftables tables (in a scratch network namespace), filled
as 1,000 busy VMs would leave them: 4 SMTP ports each, a destination sketch
each, blocked-attempt counters for 2 ports each.
"""

from __future__ import annotations

import ctypes
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from smtpguard.datapath import maps
from smtpguard.datapath.interfaces import VmIface
from smtpguard.datapath.loader import Datapath, Sizes, ensure_bpffs
from smtpguard.enforce import render
from smtpguard.enforce.desired import Capabilities, Desired
from smtpguard.enforce.nftables import NftablesEnforcer, in_scratch_netns
from smtpguard.metrics import DatapathCollector, EnforcementCollector, Health
from smtpguard.policy import Policy
from table import Row

N = 1000
SECTION = "8 agent CPU"


def fill(dp: Datapath, ports: tuple[int, ...]) -> dict[int, VmIface]:
    stats, dests = dp.table("smtp_stats"), dp.table("smtp_dests")
    now_epoch = time.monotonic_ns() >> maps.FINE_SLOT_SHIFT
    ifaces = {}
    for i in range(N):
        ifindex = 1000 + i
        ifaces[ifindex] = VmIface(ifindex, f"vnet{i}", f"vm{i}", "vnet*")
        for p in ports:
            stats[maps.SmtpKey(ifindex, p)] = maps.SmtpStats(attempts=i * 7 + p, completed=i,
                                                             packets=i * 20, bytes=i * 1500)
        sk = maps.DestSketch()
        for s in range(3):
            sk.fine[s].epoch = (now_epoch - s) | maps.SLOT_LIVE
            sk.fine[s].bits[0] = 0xFF << s
            sk.fine[s].reg[s] = 3
        dests[ctypes.c_uint32(ifindex)] = sk
    return ifaces


def scrape_cpu(collectors: list[Any], rounds: int = 20) -> list[float]:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        generate_latest(reg)
        out.append(time.process_time() - t0)
    return out


def run() -> list[Row]:
    rows = []
    for label, ports in (("2 SMTP ports each", (25, 587)),
                         ("all 4 SMTP ports each", (25, 465, 587, 2525))):
        rows += measure(label, ports)
    return rows


def measure(label: str, ports: tuple[int, ...]) -> list[Row]:
    ensure_bpffs(Path("/sys/fs/bpf"))
    pin = Path(f"/sys/fs/bpf/smtpguard-bench/scrape-{uuid.uuid4().hex[:8]}")
    dp = Datapath(pin, Sizes(max_ifaces=N + 64))
    try:
        dp.load()
        ifaces = fill(dp, ports)
        from smtpguard.datapath.snapshot import take

        def snap() -> Any:
            return take(dp.table("smtp_stats"), dp.table("smtp_dests"))

        health = Health(vm_states={v.vm: "ok" for v in ifaces.values()})
        datapath = DatapathCollector(snap, lambda: ifaces, lambda: True, lambda: health)

        def with_nft() -> list[float]:
            enf = NftablesEnforcer(Capabilities(False, True))
            enf.apply(Desired(Policy(), {v.ifname: "default" for v in ifaces.values()}))
            elems = [{"concat": [v.ifname, p]} for v in ifaces.values() for p in (25, 587)]
            for fam in render.FAMILIES:
                enf._json([{"add": {"element": {"family": fam, "table": render.TABLE,
                                                "name": "cnt_port25", "elem": elems}}}],
                          "bench elements")
            return scrape_cpu([datapath, EnforcementCollector(enf, lambda: ifaces)])

        only_dp = scrape_cpu([datapath])
        full = in_scratch_netns(with_nft)
    finally:
        dp.close()
        shutil.rmtree(pin, ignore_errors=True)
    dp_ms, full_ms = statistics.median(only_dp) * 1000, statistics.median(full) * 1000
    return [
        Row(SECTION, f"CPU per scrape, 1,000 busy VMs, {label}", full_ms, "ms",
            f"datapath part alone {dp_ms:.0f} ms", "< 200 ms", full_ms < 200,
            note="in-process (prometheus_client generate_latest) over maps and nftables "
                 "counters filled as busy VMs leave them; the rest is nftables counters"),
    ]
