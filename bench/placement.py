"""Where the enforcement hooks, and what each placement costs a packet that
is not SMTP: bridge-family prerouting (today), a netdev table on each VM
device's own ingress (Open vSwitch ports; and a macvtap's egress), and the
peer's one-chain approach, side by side with no rules at all.

The lab is throughput.py's (vm1 -> vm2 across the hypervisor's bridge,
measured with its iperf and CPU accounting); the variants, interleaved over
ROUNDS (each round starting at the next one):

  none           no rules at all (onpath.check_off: no table, no filter)
  bridge floor   an empty bridge-family prerouting base chain, priority -300:
                 today's floor
  ingress floor  an empty netdev ingress base chain on each VM's host-side
                 veth (vm1's and vm2's: every VM device gets one)
  smtpguard      smtpguard's bridge and inet tables, applied by the agent's
                 NftablesEnforcer from a Desired of 1,000 VM interfaces
                 (onpath.POLICY: port 25 blocked, ceilings on 465/587/2525;
                 the 998 others are names only: nftables matches by name);
                 no tc classifier, so the tables alone
  netdev         the same rule tree in a netdev table on the two VM devices'
                 ingress: the agent's own rendering (Desired.hooks, applied by
                 the same enforcer, its bridge and inet tables then deleted)
  smtp-gate      the peer's: one bridge chain (filter prerouting) with
                 `ether saddr != @allowed tcp dport { 25, 465 } drop`, 1,000
                 allowed MACs, neither VM's among them
  egress floor   an empty netdev egress base chain on each VM's host-side veth
                 (a macvtap's guest traffic leaves through its egress)

The bench traffic is not SMTP, which is the point: the cost on ordinary
packets. vm2's device is hooked as vm1's so that TCP's ACKs (vm2 -> vm1)
meet a netdev chain as they meet the bridge chains; 64-byte UDP is one way.
Ratios are per CPU-second of the flow, the median of each round's ratio to
that round's no-rules run; per-packet costs are 1/pps - 1/pps(none), pps per
CPU-second, median of the rounds. Everything lives in the lab's namespaces
(prefix sgpl), which go in a finally block.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import flows
import onpath
from smtpguard.daemon.netns import run_in
from smtpguard.enforce import render
from smtpguard.enforce.desired import Desired
from smtpguard.lab import topology
from smtpguard.policy import load_text
from table import Row, fmt

SECTION = "10 placement"
ROUNDS = 6
SECONDS = 1  # per iperf3 run (whole seconds: iperf3 -t); more rounds beat longer runs
N = onpath.N
HOOKED = ("veth-vm1", "veth-vm2")  # the VM devices a netdev chain hooks
VARIANTS = ("none", "bridge floor", "ingress floor", "smtpguard", "netdev", "smtp-gate",
            "egress floor")
LABEL = {
    "bridge floor": "empty bridge prerouting chain (today's floor)",
    "ingress floor": "empty netdev ingress chains",
    "smtpguard": "smtpguard bridge+inet tables (1,000 VMs)",
    "netdev": "smtpguard's rule tree in a netdev table on ingress",
    "smtp-gate": "smtp-gate's bridge chain (1,000 MACs)",
    "egress floor": "empty netdev egress chains",
}
TABLE = "sgpl"  # our tables in the lab's hypervisor namespace (smtpguard's own: render.TABLE)
PORTS = (25, 465)  # smtp-gate's


def _range(values: list[float]) -> str:
    return f"{min(values):+.0f} to {max(values):+.0f}"


def _nft(lab: topology.Lab, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "-f", "-"], input=script,
                   text=True, check=True, capture_output=True)


def _drop_tables(lab: topology.Lab) -> None:
    """Every table in the hypervisor's namespace (all of them are ours)."""
    subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "flush", "ruleset"], check=True)


def _chains(hook: str) -> str:
    """An empty base chain on each VM device's `hook` (ingress or egress)."""
    return "".join(f"\tchain {hook}_{i} {{ type filter hook {hook} device {dev} priority -300; "
                   f"policy accept; }}\n" for i, dev in enumerate(HOOKED, 1))


def floor_script(kind: str) -> str:
    if kind == "bridge floor":
        return (f"table bridge {TABLE} {{\n\tchain prerouting {{ type filter hook prerouting "
                f"priority -300; policy accept; }}\n}}\n")
    return f"table netdev {TABLE} {{\n{_chains('ingress' if 'ingress' in kind else 'egress')}}}\n"


def gate_script(avoid: set[str]) -> str:
    """smtp-gate: 1,000 allowed MACs (none of the lab's), one rule."""
    macs = [m for m in (f"02:5c:00:00:{i >> 8:02x}:{i & 255:02x}" for i in range(N + 2))
            if m not in avoid][:N]
    return (f"table bridge {TABLE} {{\n\tset allowed {{ type ether_addr; elements = "
            f"{{ {', '.join(macs)} }}; }}\n\tchain prerouting {{ type filter hook prerouting "
            f"priority filter; policy accept;\n\t\tether saddr != @allowed tcp dport "
            f"{{ {', '.join(map(str, PORTS))} }} drop\n\t}}\n}}\n")


def desired() -> Desired:
    """throughput.py's policy with 1,000 VM interfaces (the lab's two among them)."""
    ifnames = [f"vnet{i}" for i in range(N - len(HOOKED))] + list(HOOKED)
    return Desired(load_text(onpath.POLICY), {n: "tenant" for n in ifnames})


class Placements:
    """Switches the variants on and off in one lab's hypervisor."""

    def __init__(self, lab: topology.Lab) -> None:
        self.lab = lab
        self.want = desired()
        self.gate = gate_script({_mac(lab, "vm1"), _mac(lab, "vm2")})
        self.enforcer: Any = None
        self.netdev_table = render.TABLE
        self.verdict = ""

    def on(self, variant: str) -> None:
        if variant == "none":
            onpath.check_off(self.lab)
        elif variant == "smtpguard":
            run_in(self.lab.hv, lambda: self._enforce(self.want))
        elif variant == "netdev":
            # The agent's own netdev table, hooked on the two VM devices; its
            # bridge and inet tables (applied in the same step) deleted.
            hooked = replace(self.want, hooks=dict.fromkeys(HOOKED, "ingress"))
            run_in(self.lab.hv, lambda: self._enforce(hooked))
            _nft(self.lab, "".join(f"delete table {fam} {render.TABLE}\n"
                                   for fam in render.FAMILIES if fam != "netdev"))
            self.verdict = "reject" if self.enforcer.caps.reject_netdev else "drop"
        elif variant == "smtp-gate":
            _nft(self.lab, self.gate)
        else:
            _nft(self.lab, floor_script(variant))

    def _enforce(self, want: Desired) -> None:
        from smtpguard.enforce.nftables import NftablesEnforcer

        if self.enforcer is None:  # its libnftables context lives in this namespace
            self.enforcer = NftablesEnforcer()
        self.enforcer.apply(want)

    def off(self) -> None:
        _drop_tables(self.lab)


def _mac(lab: topology.Lab, vm: str) -> str:
    def read() -> str:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return str(ipr.get_links(ifname="eth0")[0].get_attr("IFLA_ADDRESS"))

    return run_in(lab.vm_ns(vm), read)


def _counted(lab: topology.Lab, family: str, table: str, reason: str) -> int:
    """Packets in the rejection counter set of (family, table) for vm1's device."""
    out = subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "-j", "list", "set", family,
                          table, f"cnt_{reason}"], capture_output=True, text=True, check=True)
    total = 0
    for obj in json.loads(out.stdout)["nftables"]:
        for elem in obj.get("set", {}).get("elem", []):
            e = elem.get("elem", {})
            if "veth-vm1" in json.dumps(e.get("val")):
                total += int(e.get("counter", {}).get("packets", 0))
    return total


def _stopped(lab: topology.Lab) -> bool:
    """A connection from vm1 to port 25 (the sink serves it) did not complete."""
    return run_in(lab.vm_ns("vm1"), lambda: onpath.refused(topology.dest_addr(0), 25))


def check(lab: topology.Lab, sw: Placements) -> str:
    """Not a timing: with the netdev table alone, a SYN from vm1 to port 25
    is stopped and counted by it; the bridge+inet tables and smtp-gate's
    chain stop it too."""
    sw.off()
    sw.on("netdev")
    try:
        stopped = _stopped(lab)
        counted = _counted(lab, "netdev", sw.netdev_table, "port25")
        tables = subprocess.run(["ip", "netns", "exec", lab.hv, "nft", "list", "tables"],
                                capture_output=True, text=True, check=True).stdout
    finally:
        sw.off()
    tables = ", ".join(t for t in tables.splitlines() if t)
    if not stopped or counted < 1:
        raise RuntimeError(f"netdev table: port 25 from vm1 stopped {stopped}, counted "
                           f"{counted}; tables {tables}")
    others = {}
    for variant in ("smtpguard", "smtp-gate"):
        sw.on(variant)
        try:
            others[variant] = "stopped" if _stopped(lab) else "NOT stopped"
        finally:
            sw.off()
    return (f"port 25 from vm1 with the agent's netdev table alone ({tables}): "
            f"{dict(reject='rejected', drop='dropped')[sw.verdict]}, {counted} counted in "
            f"its cnt_port25 for veth-vm1; with smtpguard's bridge+inet tables "
            f"{others['smtpguard']}, with smtp-gate's chain {others['smtp-gate']}")


Figures = dict[str, dict[str, list[flows.Flow]]]


def measure(rounds: int, seconds: int) -> tuple[Figures, str]:
    lab = topology.Lab(f"sgpl{uuid.uuid4().hex[:5]}")
    server: subprocess.Popen[bytes] | None = None
    got: Figures = {v: {"tcp": [], "udp": []} for v in VARIANTS}
    kept, flows.SECONDS = flows.SECONDS, seconds  # iperf() reads it per run
    try:
        topology.up(lab, 2)
        sw = Placements(lab)
        notes = check(lab, sw)
        server = subprocess.Popen(
            ["ip", "netns", "exec", lab.vm_ns("vm2"), "iperf3", "-s", "-B", lab.vm_addr(2)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ksoftirqd = flows.ksoftirqd_pids()
        time.sleep(0.3)
        for kind in ("tcp", "udp"):  # not counted: vm1 -> vm2's first packets resolve
            flows.iperf(lab, kind == "udp", server.pid, ksoftirqd)
        for r in range(rounds):
            k = r % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:
                sw.on(variant)
                try:
                    for kind in ("tcp", "udp"):
                        got[variant][kind].append(
                            flows.iperf(lab, kind == "udp", server.pid, ksoftirqd))
                finally:
                    sw.off()
    finally:
        flows.SECONDS = kept
        if server is not None:
            server.terminate()
            server.wait(10)
        topology.down(lab)
    return got, notes


def run(rounds: int = ROUNDS, seconds: int = SECONDS) -> list[Row]:
    if shutil.which("iperf3") is None:
        raise RuntimeError("iperf3 is not installed (make setup)")
    t0 = time.monotonic()
    got, checked = measure(rounds, seconds)
    took = time.monotonic() - t0

    def med(v: str, kind: str, per_cpu: bool = False) -> float:
        return statistics.median(f.per_cpu if per_cpu else f.rate for f in got[v][kind])

    def paired(a: str, b: str, kind: str, fn: Callable[[flows.Flow, flows.Flow],
                                                       float]) -> list[float]:
        return flows.paired(got[a][kind], got[b][kind], fn)

    def ratio(v: str, kind: str, per_cpu: bool = True, base: str = "none") -> list[float]:
        return paired(v, base, kind, lambda x, b: x.per_cpu / b.per_cpu if per_cpu
                      else x.rate / b.rate)

    def ns(v: str, base: str = "none") -> list[float]:
        return paired(v, base, "udp",
                      lambda x, b: 1e3 * flows.us_per_packet(x.per_cpu, b.per_cpu))

    def row(v: str, kind: str) -> Row:
        unit = "Gbit/s" if kind == "tcp" else "packets/s"
        each = ratio(v, kind)
        what = "TCP bulk" if kind == "tcp" else "64-byte packets"
        return Row(SECTION, f"{what}, {LABEL[v]}", med(v, kind),
                   f"{unit} ({statistics.median(each):.3f} of none per CPU-s, raw "
                   f"{statistics.median(ratio(v, kind, False)):.3f})",
                   f"no rules {fmt(med('none', kind))} {unit}",
                   note=f"per-round ratios per CPU-second {flows.span(each)}")

    rows = [
        Row(SECTION, "TCP bulk vm1 -> vm2, no rules", med("none", "tcp"), "Gbit/s",
            note=f"throughput.py's lab and measurement (iperf3, CPU of the flow); {rounds} "
                 f"interleaved rounds of {seconds} s runs, 7 variants, medians; ratios: "
                 f"median of each round's ratio to its no-rules run; whole benchmark "
                 f"{took:.0f} s"),
        Row(SECTION, "64-byte packets vm1 -> vm2, no rules", med("none", "udp"), "packets/s",
            f"{1e9 / med('none', 'udp', True):.0f} ns CPU a packet", note=checked),
    ]
    for v in VARIANTS[1:]:
        rows += [row(v, "udp"), row(v, "tcp")]
        cost = ns(v)
        rows.append(Row(SECTION, f"per-packet cost, {LABEL[v]}", statistics.median(cost),
                        "ns CPU over none", note=f"per round {_range(cost)} ns"))
    for a, b, what in (("netdev", "smtpguard", "bridged tap: netdev ingress table vs bridge+inet "
                        "tables"),
                       ("ingress floor", "bridge floor", "floors: netdev ingress vs bridge "
                        "prerouting")):
        diff = ns(a, b)
        each = ratio(a, "udp", base=b)
        rows.append(Row(SECTION, what, statistics.median(diff), "ns CPU a 64-byte packet",
                        f"{LABEL[b]}",
                        note=f"paired per round: {_range(diff)} ns; 64-byte pps per "
                             f"CPU-s ratio {statistics.median(each):.3f} "
                             f"({flows.span(each)}); TCP bulk ratio "
                             f"{statistics.median(ratio(a, 'tcp', base=b)):.3f}"))
    return rows


def main() -> None:
    from smtpguard.datapath.loader import ensure_bpffs
    from table import render as table

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--seconds", type=int, default=SECONDS)
    a = p.parse_args()
    ensure_bpffs(Path("/sys/fs/bpf"))
    print(table(run(a.rounds, a.seconds)))


if __name__ == "__main__":
    main()
