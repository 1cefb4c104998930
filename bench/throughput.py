"""Non-SMTP throughput between two lab VMs, through the hypervisor namespace:
no agent, smtpguard fully on, and the naive one-rule-per-VM nftables chain.

vm1 and vm2 sit on the lab's bridge in the hypervisor namespace, which also
holds 998 more VM interfaces (taps vnet0..vnet997, bench/many.py): 1,000 in
all. Every frame between the two VMs crosses veth-vm1 and veth-vm2 (the tc
classifiers, both hooks) and the bridge's netfilter hooks.

  none       nothing of ours in the hypervisor
  tc floor   an empty tc program on both hooks of the two VMs' interfaces,
             attached as smtpguard attaches its own: what any tc classifier
             costs before it does anything
  nft floor  empty base chains where smtpguard hooks (bridge and inet
             prerouting, priority -300): what any nftables enforcement costs
             a packet before its first rule
  smtpguard  the real agent (BPF on all 1,000 interfaces + nftables), every
             VM in a class with port 25 blocked and a ceiling on 465/587/2525,
             so its per-VM maps hold 1,000 elements
  naive      no agent; `iifname "<vm>" tcp dport 25 drop` for each of the
             1,000 VMs in one bridge forward chain, the lab's two last, so
             every frame walks them all

TCP bulk: one iperf3 stream vm1 -> vm2. Small packets: one iperf3 UDP stream,
unlimited rate, 18-byte payload (18 + 8 UDP + 20 IPv4 + 14 Ethernet = 60-byte
frames on the veths, 64 bytes on a wire with its FCS), counted as the packets
vm2's interface received (what the hypervisor delivered, not what iperf3 read).

On a shared 2-core machine a neighbour's CPU use moves raw throughput by 10-30%
from one second to the next, more than the 3% being judged. So each run also
records the CPU the flow consumed (the iperf3 processes, whose context runs the
whole forwarding path in softirq, plus ksoftirqd) and the verdict is on
throughput per CPU-second: what the flow would do on cores of its own, which
neighbours move far less (1-3% run to run for small packets; TCP bulk stays
noisier, 5-15%, so read its verdict with the per-round spread in its note).
For UDP the receiving iperf3 is left out (it spins on recv whatever arrives;
the delivery into vm2 runs in the sender's context). Raw throughput and its
ratio are reported beside it. Configurations are interleaved over ROUNDS, each
round starting at the next configuration;
figures are medians, ratios the median of each round's ratio to that round's
no-agent run. Between rounds the agent is switched off (filters detached,
tables deleted) and restarted on its pinned build, as a restart would, and
measured once idle.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bpfcost import EMPTY
from labagent import cpu_seconds
from many import add_ifaces
from smtpguard.datapath import attach
from smtpguard.datapath.interfaces import dump_links
from smtpguard.datapath.loader import ensure_bpffs
from smtpguard.lab import proc, topology
from smtpguard.netns import run_in
from table import Row, fmt

SECTION = "1 throughput"
N = 1000  # VM interfaces in the hypervisor, the lab's two included
ROUNDS = 7
SECONDS = 2
PAYLOAD = 18  # UDP payload bytes: 60-byte frames (64 with FCS)
CONFIGS = ("none", "tc floor", "nft floor", "smtpguard", "naive")
FLOOR_TABLE = "sgbench_floor"
TARGETS = {"tcp": 0.99, "udp": 0.98}  # of no agent per CPU-second (issue 20)
POLICY = """version: 1
classes:
  default: {}
  tenant:
    port25: block
    limit: {rate: 20/minute, burst: 10}
    limited_ports: [465, 587, 2525]
members:
  - {interface: "vnet*", class: tenant}
  - {interface: "veth-vm*", class: tenant}
"""
NAIVE_TABLE = "sgbench_naive"


def _sh(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out.stdout


class Agent:
    """`smtpguard run` in the lab's hypervisor, as bench/reaction.py starts it."""

    def __init__(self, lab: topology.Lab, tmp: Path) -> None:
        self.lab = lab
        self.pin = Path(f"/sys/fs/bpf/smtpguard-bench/{lab.prefix}")
        self.sg = [sys.executable, "-m", "smtpguard.cli", "run", "--netns", lab.hv,
                   "--pin-dir", str(self.pin)]
        self.tmp = tmp
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (tmp / "policy.yaml").write_text(POLICY)

    def start(self) -> float:
        """Start and wait for agent.started; seconds it took."""
        mark = self._started()
        t0 = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*self.sg, "--state-dir", str(self.tmp / "state"),
                 "--policy", str(self.tmp / "policy.yaml"), "--metrics-addr", "",
                 "--control-socket", "", "--log-interval", "3600"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while self._started() == mark:
            if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError(f"the agent did not start; see {self.log}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def _started(self) -> int:
        if not self.log.exists():
            return 0
        return self.log.read_text().count('"agent.started"')

    def cpu_seconds(self) -> float:
        """User + system CPU the running agent has used."""
        return 0.0 if self.proc is None else cpu_seconds(self.proc.pid)

    def settle(self, timeout: float = 20) -> float:
        """Wait until the agent idles (under 10% of a CPU for a second): a
        fresh agent with 1,000 VMs works for some seconds after agent.started,
        and steady state is what is measured. Seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            cpu = self.cpu_seconds()
            time.sleep(1)
            if self.cpu_seconds() - cpu < 0.1:
                break
        return time.monotonic() - t0

    def stop(self) -> None:
        proc.stop(self.proc)
        self.proc = None

    def off(self) -> None:
        """Stopped, and nothing of it left on the path (its filters and tables
        outlive it by design); the pinned build stays for the next start."""
        self.stop()
        run_in(self.lab.hv, _detach_all)
        for fam in ("bridge", "inet"):
            subprocess.run(["ip", "netns", "exec", self.lab.hv, "nft", "delete", "table",
                            fam, "smtpguard"], capture_output=True, check=False)

    def cleanup(self) -> None:
        self.stop()
        subprocess.run([*self.sg, "--cleanup"], capture_output=True, check=False)
        shutil.rmtree(self.pin, ignore_errors=True)


def _detach_all() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for ev in dump_links():
            if ev.ifname.startswith(("vnet", "veth-")):
                attach.detach(ipr, ev.ifindex, ev.ifname)


def _attach_empty(fd: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in ("veth-vm1", "veth-vm2"):
            attach.attach(ipr, ipr.link_lookup(ifname=name)[0], name, fd, fd)


def _our_filters() -> int:
    """Interfaces in this namespace with our filter on both hooks."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sum(len(attach.ours(ipr, ev.ifindex)) == 2 for ev in dump_links())


def check_on(lab: topology.Lab) -> str:
    """Raise unless the agent covers all N interfaces (filters, per-VM map
    elements in both tables) and port 25 from vm1 is refused."""
    deadline = time.monotonic() + 30
    while True:
        filters = run_in(lab.hv, _our_filters)
        elems = [_map_len(lab, fam, "vm_class") for fam in ("bridge", "inet")]
        if filters >= N and min(elems) >= N:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"smtpguard covers {filters} interfaces with filters and "
                               f"{elems} VMs in vm_class (bridge, inet), not {N}")
        time.sleep(0.5)
    refused = run_in(lab.vm_ns("vm1"), lambda: _refused(topology.dest_addr(0), 25))
    if not refused:
        raise RuntimeError("smtpguard is on but port 25 from vm1 is not refused")
    return f"{filters} interfaces filtered, {elems[0]} VMs in vm_class"


def _map_len(lab: topology.Lab, family: str, name: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "-j", "list", "map", family,
                          "smtpguard", name], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return 0
    for obj in json.loads(out.stdout)["nftables"]:
        if "map" in obj:
            return len(obj["map"].get("elem", []))
    return 0


def _refused(addr: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((addr, port), timeout=0.5).close()
    except OSError:
        return True  # reset (reject) or no answer (drop); the sink answers in ms
    return False


def naive_ruleset(ifnames: list[str]) -> str:
    rules = "".join(f'\t\tiifname "{n}" tcp dport 25 drop\n' for n in ifnames)
    return (f"table bridge {NAIVE_TABLE} {{\n\tchain forward {{\n"
            f"\t\ttype filter hook forward priority 0; policy accept;\n{rules}\t}}\n}}\n")


def naive(lab: topology.Lab, ruleset: str | None) -> None:
    """Load the naive chain (ruleset) or delete it (None)."""
    hv = ["ip", "netns", "exec", lab.hv, "nft"]
    if ruleset is None:
        subprocess.run([*hv, "delete", "table", "bridge", NAIVE_TABLE], capture_output=True,
                       check=False)
        return
    subprocess.run([*hv, "-f", "-"], input=ruleset, text=True, check=True)
    listed = _sh(*hv, "list", "chain", "bridge", NAIVE_TABLE, "forward")
    if listed.count("tcp dport 25 drop") != N:
        raise RuntimeError("the naive chain does not hold one rule per VM")


def floor(lab: topology.Lab, on: bool) -> None:
    """Empty base chains at smtpguard's hooks (on), or none (off)."""
    hv = ["ip", "netns", "exec", lab.hv, "nft"]
    for fam in ("bridge", "inet"):
        if on:
            subprocess.run([*hv, f"add table {fam} {FLOOR_TABLE}; add chain {fam} "
                            f"{FLOOR_TABLE} p {{ type filter hook prerouting priority -300; "
                            f"policy accept; }}"], check=True)
        else:
            subprocess.run([*hv, "delete", "table", fam, FLOOR_TABLE], capture_output=True,
                           check=False)


def _rx_packets(ns: str) -> int:
    def read() -> int:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            link = ipr.get_links(ifname="eth0")[0]
            return int(link.get_attr("IFLA_STATS64")["rx_packets"])

    return run_in(ns, read)


def _ksoftirqd() -> list[int]:
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
        before, cpu0 = _rx_packets(lab.vm_ns("vm2")), flow_cpu()
        out = subprocess.run(args, capture_output=True, text=True, timeout=SECONDS + 30)
        cpu = flow_cpu() - cpu0
        delivered = _rx_packets(lab.vm_ns("vm2")) - before
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


def check_off(lab: topology.Lab) -> None:
    """Raise if anything of ours is on the path (no tables, no filters)."""
    tables = _sh("ip", "netns", "exec", lab.hv, "nft", "list", "tables").strip()

    def filtered() -> list[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return [n for n in ("veth-vm1", "veth-vm2")
                    if attach.ours(ipr, ipr.link_lookup(ifname=n)[0])]

    left = run_in(lab.hv, filtered)
    if tables or left:
        raise RuntimeError(f"not a clean baseline: tables {tables!r}, filters on {left}")


Figures = dict[str, dict[str, list[Flow]]]  # config -> "tcp"/"udp" -> one per round


def measure_all() -> tuple[Figures, dict[str, Any]]:
    lab = topology.Lab(f"sgb{uuid.uuid4().hex[:5]}")
    tmp = Path(tempfile.mkdtemp(prefix="sgbench"))
    agent = Agent(lab, tmp)
    server: subprocess.Popen[bytes] | None = None
    got: Figures = {c: {"tcp": [], "udp": []} for c in CONFIGS}
    info: dict[str, Any] = {"starts": [], "settle": [], "agent_cpu": []}
    from bcc import BPF

    empty = BPF(text=EMPTY)  # the same empty program as bpfcost's baseline
    empty_fd = empty.load_func(b"empty", BPF.SCHED_CLS).fd
    try:
        topology.up(lab, 2)
        vnets = add_ifaces(lab.hv, N - 2)
        ruleset = naive_ruleset([*vnets, "veth-vm1", "veth-vm2"])
        server = subprocess.Popen(
            ["ip", "netns", "exec", lab.vm_ns("vm2"), "iperf3", "-s", "-B", lab.vm_addr(2)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ksoftirqd = _ksoftirqd()
        time.sleep(0.3)
        for r in range(ROUNDS):
            # Each round starts at another configuration: a position in the
            # round (right after an agent stopped, say) favours none of them.
            for config in CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]:
                if config == "smtpguard":
                    info["starts"].append(agent.start())
                    info["coverage"] = check_on(lab)
                    info["settle"].append(agent.settle())
                elif config == "naive":
                    naive(lab, ruleset)
                elif config == "tc floor":
                    run_in(lab.hv, lambda: _attach_empty(empty_fd))
                elif config == "nft floor":
                    floor(lab, True)
                else:
                    check_off(lab)
                cpu, t0 = agent.cpu_seconds(), time.monotonic()
                for kind in ("tcp", "udp"):
                    got[config][kind].append(iperf(lab, kind == "udp", server.pid, ksoftirqd))
                if config == "smtpguard":
                    info["agent_cpu"].append((agent.cpu_seconds() - cpu)
                                             / (time.monotonic() - t0))
                    agent.off()
                elif config == "naive":
                    naive(lab, None)
                elif config == "tc floor":
                    run_in(lab.hv, _detach_all)
                elif config == "nft floor":
                    floor(lab, False)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        agent.cleanup()
        naive(lab, None)
        floor(lab, False)
        topology.down(lab)
        shutil.rmtree(tmp, ignore_errors=True)
    return got, info


def _spread(values: list[float], scale: float = 1.0) -> str:
    return "-".join(f"{v * scale:.3g}" for v in (min(values), max(values)))


def _paired(runs: list[Flow], base: list[Flow], fn: Callable[[Flow, Flow], float]
            ) -> list[float]:
    """fn(this round's run, the no-agent run of that round), per round."""
    return [fn(x, b) for x, b in zip(runs, base, strict=True)]


def _us_per_packet(x: float, base: float) -> float:
    """1/pps - 1/pps(no agent), in microseconds."""
    return 1e6 / x - 1e6 / base


def run() -> list[Row]:
    if shutil.which("iperf3") is None:
        raise RuntimeError("iperf3 is not installed (make setup)")
    ensure_bpffs(Path("/sys/fs/bpf"))
    t0 = time.monotonic()
    got, info = measure_all()
    took = time.monotonic() - t0
    none = got["none"]

    def med(config: str, kind: str, per_cpu: bool = False) -> float:
        return statistics.median(f.per_cpu if per_cpu else f.rate for f in got[config][kind])

    def ratios(config: str, kind: str, per_cpu: bool) -> list[float]:
        return _paired(got[config][kind], none[kind],
                       lambda x, b: x.per_cpu / b.per_cpu if per_cpu else x.rate / b.rate)

    def cost(config: str, per_cpu: bool) -> float:
        return statistics.median(_paired(got[config]["udp"], none["udp"], lambda x, b: (
            _us_per_packet(x.per_cpu, b.per_cpu) if per_cpu
            else _us_per_packet(x.rate, b.rate))))

    def spread(config: str, kind: str) -> str:
        runs = got[config][kind]
        return (f"range {_spread([f.rate for f in runs])}, per CPU-second "
                f"{_spread([f.per_cpu for f in runs])}")

    def judged(config: str, kind: str, name: str, unit: str, note: str) -> Row:
        each = ratios(config, kind, True)
        cpu, raw = statistics.median(each), statistics.median(ratios(config, kind, False))
        judge = config == "smtpguard"
        return Row(SECTION, name, med(config, kind),
                   f"{unit} ({cpu:.3f} of no agent per CPU-second, raw {raw:.3f})",
                   f"no agent {fmt(med('none', kind))} {unit}, "
                   f"{fmt(med('none', kind, True))} per CPU-s",
                   f">= {TARGETS[kind]}" if judge else "", cpu >= TARGETS[kind] if judge else None,
                   f"{spread(config, kind)}; per-round ratios per CPU-second "
                   f"{_spread(each)}; {note}".rstrip("; "))

    return [
        Row(SECTION, "TCP bulk vm1 -> vm2, no agent", med("none", "tcp"), "Gbit/s",
            note=f"one iperf3 stream across the hypervisor's bridge; {ROUNDS} interleaved "
                 f"rounds of {SECONDS} s runs, medians; ratios: the median of each round's "
                 f"ratio to its no-agent run, judged per CPU-second of the flow (iperf3 "
                 f"processes + ksoftirqd); {spread('none', 'tcp')}"),
        judged("smtpguard", "tcp", "TCP bulk, smtpguard on (1,000 VMs)", "Gbit/s",
               f"checked each round: {info['coverage']}, port 25 refused; agent start "
               f"{_spread(info['starts'])} s, idle {_spread(info['settle'])} s later, its "
               f"CPU while measured {_spread(info['agent_cpu'], 100)}% of one"),
        Row(SECTION, "64-byte packets vm1 -> vm2, no agent", med("none", "udp"), "packets/s",
            note=f"iperf3 UDP, unlimited rate, {PAYLOAD}-byte payload: 60-byte frames on the "
                 f"veths, 64 with a wire's FCS; counted as received by vm2's interface; CPU: "
                 f"the sender's (its softirq delivers into vm2) + ksoftirqd; "
                 f"{spread('none', 'udp')}"),
        judged("smtpguard", "udp", "64-byte packets, smtpguard on (1,000 VMs)", "packets/s",
               ""),
        judged("tc floor", "udp", "64-byte packets, empty tc programs only", "packets/s",
               "the floor of any tc classifier: an empty program on both hooks of the two "
               "VMs' interfaces, no tables"),
        Row(SECTION, "per-packet cost, empty tc programs only", cost("tc floor", True),
            "us CPU", f"smtpguard {cost('smtpguard', True):.2f} us CPU",
            note="of smtpguard's per-packet cost, this much is the tc hook itself"),
        judged("nft floor", "udp", "64-byte packets, empty nftables base chains only",
               "packets/s", "the floor of any nftables enforcement here: empty base chains "
               "at bridge and inet prerouting (br_netfilter hands bridged frames to both)"),
        Row(SECTION, "per-packet cost, empty nftables base chains only", cost("nft floor", True),
            "us CPU", f"smtpguard {cost('smtpguard', True):.2f} us CPU",
            note="of smtpguard's per-packet cost, this much is netfilter's hooks being on"),
        Row(SECTION, "per-packet cost, smtpguard on", cost("smtpguard", True), "us CPU",
            f"no agent {1e6 / med('none', 'udp', True):.2f} us CPU/packet",
            note=f"1/pps - 1/pps(no agent), pps per CPU-second, median of the rounds; from "
                 f"raw pps {cost('smtpguard', False):+.2f} us"),
        judged("naive", "tcp", "TCP bulk, naive chain (1,000 rules)", "Gbit/s",
               f"no agent; one `iifname \"<vm>\" tcp dport 25 drop` per VM in a bridge "
               f"forward chain, the lab's two last: every frame walks all {N}"),
        judged("naive", "udp", "64-byte packets, naive chain (1,000 rules)", "packets/s", ""),
        Row(SECTION, "per-packet cost, naive chain (1,000 rules)", cost("naive", True),
            "us CPU", f"smtpguard {cost('smtpguard', True):.2f} us CPU",
            note=f"as for smtpguard; from raw pps {cost('naive', False):+.1f} us; whole "
                 f"benchmark {took:.0f} s"),
    ]


if __name__ == "__main__":
    from table import render

    print(render(run()))
