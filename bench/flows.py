"""One iperf3 flow from the lab's vm1 to vm2 (throughput.py's lab), and the
CPU it consumed: TCP bulk, or one UDP stream of 60-byte frames counted as
vm2's interface received them; and the per-round comparisons of such flows."""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labagent import cpu_seconds
from smtpguard.daemon.netns import run_in
from smtpguard.lab import topology

SECONDS = 2  # per iperf3 run (placement.py sets its own while it measures)
PAYLOAD = 18  # UDP payload bytes: 60-byte frames (64 with FCS)


def rx_packets(ns: str) -> int:
    """Packets eth0 of namespace ns has received."""
    def read() -> int:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            link = ipr.get_links(ifname="eth0")[0]
            return int(link.get_attr("IFLA_STATS64")["rx_packets"])

    return run_in(ns, read)


def ksoftirqd_pids() -> list[int]:
    """The ksoftirqd threads, whose CPU a flow's softirq work may land on."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):  # a process that just ended
            if comm.read_text().startswith("ksoftirqd/"):
                pids.append(int(comm.parent.name))
    return pids


@dataclass(frozen=True)
class Flow:
    rate: float  # Gbit/s (TCP) or packets/s delivered (UDP)
    per_cpu: float  # the same per CPU-second the flow used


def iperf(lab: topology.Lab, udp: bool, server: int, ksoftirqd: list[int]) -> Flow:
    """One run vm1 -> vm2 (server: the iperf3 server's pid, in vm2)."""
    args = ["ip", "netns", "exec", lab.vm_ns("vm1"), "iperf3", "-c", lab.vm_addr(2),
            "-t", str(SECONDS), "-J"]
    if udp:
        args += ["-u", "-b", "0", "-l", str(PAYLOAD)]

    def flow_cpu() -> float:
        """The client counts once reaped (our children's rusage)."""
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (reaped.ru_utime + reaped.ru_stime + sum(map(cpu_seconds, ksoftirqd))
                + (0 if udp else cpu_seconds(server)))

    for attempt in range(5):
        before, cpu0 = rx_packets(lab.vm_ns("vm2")), flow_cpu()
        out = subprocess.run(args, capture_output=True, text=True, timeout=SECONDS + 30)
        cpu = flow_cpu() - cpu0
        delivered = rx_packets(lab.vm_ns("vm2")) - before
        res: dict[str, Any] = json.loads(out.stdout or "{}")
        if "error" not in res and out.returncode == 0:
            break
        if attempt == 4:  # the server may still be busy with the previous test
            raise RuntimeError(f"iperf3: {res.get('error') or out.stderr.strip()}")
        time.sleep(0.3)
    end = res["end"]
    if udp:
        return Flow(delivered / float(end["sum_sent"]["seconds"]), delivered / cpu)
    got = end["sum_received"]
    return Flow(float(got["bits_per_second"]) / 1e9, float(got["bytes"]) * 8 / 1e9 / cpu)


def span(values: list[float], scale: float = 1.0) -> str:
    """min-max of the values (times scale), as text."""
    return "-".join(f"{v * scale:.3g}" for v in (min(values), max(values)))


def paired(runs: list[Flow], base: list[Flow], fn: Callable[[Flow, Flow], float]
           ) -> list[float]:
    """fn(this round's run, the no-agent run of that round), per round."""
    return [fn(x, b) for x, b in zip(runs, base, strict=True)]


def us_per_packet(x: float, base: float) -> float:
    """1/pps - 1/pps(no agent), in microseconds."""
    return 1e6 / x - 1e6 / base
