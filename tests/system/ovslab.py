"""Lab VMs on Open vSwitch in the system tier's machine, plugged in as an
OVS hypervisor plugs its guests (OpenStack ML2/OVS, OVN, libvirt's
<virtualport type='openvswitch'>): run inside the guest with the installed
agent's Python (/opt/smtpguard/venv/bin/python ovslab.py up|vm|move|send|down).

    sgovs-br            an OVS bridge (the kernel datapath: ovs-system)
    sgovs-lbr           a Linux bridge, patched to sgovs-br (sgovs-lp/sgovs-op)
    sgovs-sink          the SMTP sink (smtpguard.lab.sink on 25 and 587),
                        198.18.0.2 / fdac:25::2, its veth sgovs-sink0 on OVS
    sgovs-NAME          VM NAME's namespace: eth0 198.18.0.(10+N), fdac:25::(10+N);
                        its host side (veth-sgovsN unless named) is an OVS port
                        or a Linux bridge port, with an ifalias or external_ids

Names outside the VM-facing patterns (sgovs-*) are the lab's plumbing; the
VMs' host sides match the policy's patterns (veth*, tap*), as a hypervisor's do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import IPRoute, netns

from smtpguard.lab.traffic import SendPlan, send

P = "sgovs"
OVS_BR, LBR = f"{P}-br", f"{P}-lbr"
PATCH_L, PATCH_O = f"{P}-lp", f"{P}-op"  # the Linux bridge's end, OVS's end
SINK_NS = f"{P}-sink"
SINK4, SINK6 = "198.18.0.2", "fdac:25::2"
READY = Path(f"/run/{P}-sink.ready")
PIDFILE = Path(f"/run/{P}-sink.pid")
NODAD = 0x02


def vsctl(*args: str) -> str:
    r = subprocess.run(["ovs-vsctl", "--timeout=30", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ovs-vsctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def up() -> None:
    vsctl("--may-exist", "add-br", OVS_BR)
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=OVS_BR)[0], state="up")
        if not ipr.link_lookup(ifname=LBR):
            ipr.link("add", ifname=LBR, kind="bridge")
        lbr = ipr.link_lookup(ifname=LBR)[0]
        ipr.link("set", index=lbr, state="up")
        if not ipr.link_lookup(ifname=PATCH_L):
            ipr.link("add", ifname=PATCH_L, kind="veth", peer={"ifname": PATCH_O})
            ipr.link("set", index=ipr.link_lookup(ifname=PATCH_L)[0], master=lbr, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname=PATCH_O)[0], state="up")
        vsctl("--may-exist", "add-port", OVS_BR, PATCH_O)
        if SINK_NS not in netns.listnetns():
            netns.create(SINK_NS)
            ipr.link("add", ifname=f"{P}-sink0", kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": SINK_NS})
            ipr.link("set", index=ipr.link_lookup(ifname=f"{P}-sink0")[0], state="up")
            vsctl("--may-exist", "add-port", OVS_BR, f"{P}-sink0")
            _addresses(SINK_NS, SINK4, SINK6)
            _start_sink()
    print(json.dumps({"ovs": OVS_BR, "bridge": LBR}))


def vm(name: str, index: int, on: str, ifname: str | None, ifalias: str | None,
       external_ids: list[str], mac: str | None, host_mac: str | None) -> None:
    """A VM's namespace and its host-side veth, plugged into OVS (with the
    Interface's external_ids, as the hypervisor sets them) or the Linux bridge."""
    ns, host = f"{P}-{name}", ifname or f"veth-{P}{index}"
    netns.create(ns)
    peer: dict[str, object] = {"ifname": "eth0", "net_ns_fd": ns}
    if mac:
        peer["address"] = mac
    with IPRoute() as ipr:
        ipr.link("add", ifname=host, kind="veth", peer=peer,
                 **({"address": host_mac} if host_mac else {}))
        idx = ipr.link_lookup(ifname=host)[0]
        if ifalias:
            ipr.link("set", index=idx, ifalias=ifalias)
        ipr.link("set", index=idx, state="up")
    _addresses(ns, f"198.18.0.{10 + index}", f"fdac:25::{10 + index:x}")
    plug(host, on, external_ids)
    print(json.dumps({"vm": name, "netns": ns, "interface": host, "on": on}))


def plug(host: str, on: str, external_ids: Sequence[str] = ()) -> None:
    if on == "ovs":
        # One transaction, as libvirt and os-vif do: the port and its ids.
        extra = ["--", "set", "Interface", host,
                 *(f"external_ids:{kv}" for kv in external_ids)] if external_ids else []
        vsctl("--may-exist", "add-port", OVS_BR, host, *extra)
    else:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=host)[0],
                     master=ipr.link_lookup(ifname=LBR)[0])


def move(host: str, to: str) -> None:
    """Take a VM's interface off its switch and plug it into the other one:
    `ip link set nomaster` / `ovs-vsctl del-port`, then the new master."""
    if to == "ovs":
        subprocess.run(["ip", "link", "set", host, "nomaster"], check=True)
    else:
        vsctl("--if-exists", "del-port", OVS_BR, host)
    plug(host, to)
    print(json.dumps({"interface": host, "on": to}))


def _addresses(ns: str, a4: str, a6: str) -> None:
    with IPRoute(netns=ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        eth = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth, address=a4, prefixlen=24)
        ipr.addr("add", index=eth, address=a6, prefixlen=64, flags=NODAD)
        ipr.link("set", index=eth, state="up")


def _start_sink() -> None:
    READY.unlink(missing_ok=True)
    log = open(f"/run/{P}-sink.log", "ab")  # noqa: SIM115 - the child's
    proc = subprocess.Popen([sys.executable, "-m", "smtpguard.lab.sink", "--netns", SINK_NS,
                             "--ports", "25,587", "--ready", str(READY)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    PIDFILE.write_text(str(proc.pid))
    deadline = time.monotonic() + 60
    while not READY.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the sink did not start; see /run/{P}-sink.log")
        time.sleep(0.1)


def do_send(name: str, connections: int, port: int, ipv6: bool, timeout: float) -> None:
    netns.setns(f"{P}-{name}", flags=0)  # before any thread: the whole process moves
    plan = SendPlan(connections=connections, port=port, family=6 if ipv6 else 4,
                    timeout=timeout, to=SINK6 if ipv6 else SINK4)
    print(json.dumps(asyncio.run(send(plan))))


def down() -> None:
    try:
        os.killpg(int(PIDFILE.read_text()), signal.SIGTERM)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    for ns in netns.listnetns():
        if ns.startswith(f"{P}-"):
            netns.remove(ns)  # their veth pairs go with them
    subprocess.run(["ovs-vsctl", "--timeout=30", "--if-exists", "del-br", OVS_BR],
                   capture_output=True)
    with IPRoute() as ipr:
        for name in (PATCH_L, LBR):
            for idx in ipr.link_lookup(ifname=name):
                ipr.link("del", index=idx)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up")
    v = sub.add_parser("vm")
    v.add_argument("name")
    v.add_argument("--index", type=int, required=True, help="addresses 198.18.0.(10+N)")
    v.add_argument("--on", choices=("ovs", "bridge"), default="ovs")
    v.add_argument("--ifname", help="the host side's name (default veth-sgovsN)")
    v.add_argument("--ifalias")
    v.add_argument("--external-id", action="append", default=[], help="KEY=VALUE")
    v.add_argument("--mac", help="the VM's (eth0's) MAC")
    v.add_argument("--host-mac", help="the host side's MAC (libvirt's taps: fe:...)")
    mv = sub.add_parser("move")
    mv.add_argument("interface")
    mv.add_argument("--to", choices=("ovs", "bridge"), required=True)
    s = sub.add_parser("send")
    s.add_argument("vm")
    s.add_argument("--connections", type=int, default=3)
    s.add_argument("--port", type=int, default=25)
    s.add_argument("--ipv6", action="store_true")
    s.add_argument("--timeout", type=float, default=5.0)
    sub.add_parser("down")
    args = ap.parse_args()
    if args.cmd == "up":
        up()
    elif args.cmd == "vm":
        vm(args.name, args.index, args.on, args.ifname, args.ifalias, args.external_id,
           args.mac, args.host_mac)
    elif args.cmd == "move":
        move(args.interface, args.to)
    elif args.cmd == "send":
        do_send(args.vm, args.connections, args.port, args.ipv6, args.timeout)
    else:
        down()


if __name__ == "__main__":
    main()
