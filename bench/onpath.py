"""What sits on the path between throughput.py's two lab VMs in each of its
configurations: the agent, an empty tc program, empty base chains, the naive
one-rule-per-VM chain; each put on, checked, and taken off again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from labagent import cpu_seconds
from smtpguard.daemon.netns import run_in
from smtpguard.datapath import attach
from smtpguard.datapath.interfaces import dump_links
from smtpguard.lab import proc, topology

N = 1000  # VM interfaces in the hypervisor, the lab's two included
FLOOR_TABLE = "sgbench_floor"
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


def sh(*args: str, timeout: float = 60) -> str:
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
        run_in(self.lab.hv, detach_all)
        for fam in ("bridge", "inet"):
            subprocess.run(["ip", "netns", "exec", self.lab.hv, "nft", "delete", "table",
                            fam, "smtpguard"], capture_output=True, check=False)

    def cleanup(self) -> None:
        self.stop()
        subprocess.run([*self.sg, "--cleanup"], capture_output=True, check=False)
        shutil.rmtree(self.pin, ignore_errors=True)


def detach_all() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for ev in dump_links():
            if ev.ifname.startswith(("vnet", "veth-")):
                attach.detach(ipr, ev.ifindex, ev.ifname)


def attach_empty(fd: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in ("veth-vm1", "veth-vm2"):
            attach.attach(ipr, ipr.link_lookup(ifname=name)[0], name, fd, fd)


def our_filters() -> int:
    """Interfaces in this namespace with our filter on both hooks."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sum(len(attach.ours(ipr, ev.ifindex)) == 2 for ev in dump_links())


def check_on(lab: topology.Lab) -> str:
    """Raise unless the agent covers all N interfaces (filters, per-VM map
    elements in both tables) and port 25 from vm1 is refused."""
    deadline = time.monotonic() + 30
    while True:
        filters = run_in(lab.hv, our_filters)
        elems = [map_len(lab, fam, "vm_class") for fam in ("bridge", "inet")]
        if filters >= N and min(elems) >= N:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"smtpguard covers {filters} interfaces with filters and "
                               f"{elems} VMs in vm_class (bridge, inet), not {N}")
        time.sleep(0.5)
    refused = run_in(lab.vm_ns("vm1"), lambda: refused(topology.dest_addr(0), 25))
    if not refused:
        raise RuntimeError("smtpguard is on but port 25 from vm1 is not refused")
    return f"{filters} interfaces filtered, {elems[0]} VMs in vm_class"


def map_len(lab: topology.Lab, family: str, name: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "-j", "list", "map", family,
                          "smtpguard", name], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return 0
    for obj in json.loads(out.stdout)["nftables"]:
        if "map" in obj:
            return len(obj["map"].get("elem", []))
    return 0


def refused(addr: str, port: int) -> bool:
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
    listed = sh(*hv, "list", "chain", "bridge", NAIVE_TABLE, "forward")
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


def check_off(lab: topology.Lab) -> None:
    """Raise if anything of ours is on the path (no tables, no filters)."""
    tables = sh("ip", "netns", "exec", lab.hv, "nft", "list", "tables").strip()

    def filtered() -> list[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return [n for n in ("veth-vm1", "veth-vm2")
                    if attach.ours(ipr, ipr.link_lookup(ifname=n)[0])]

    left = run_in(lab.hv, filtered)
    if tables or left:
        raise RuntimeError(f"not a clean baseline: tables {tables!r}, filters on {left}")
