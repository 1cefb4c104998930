"""Lab VMs on the system tier's machine, plugged into the host the way a
hypervisor plugs its guests: run inside the guest with the installed agent's
Python (/opt/smtpguard/venv/bin/python guestlab.py up|send|down).

Unlike `smtpguard lab`, whose hypervisor is a namespace of its own, here the
hypervisor is the machine itself, so the agent that systemd runs (in the
host's namespace, as installed) sees the VMs' interfaces:

    sgsys-br            a bridge in the host's namespace
    veth-sgsysN         VM N's interface on it (ifalias vmN), namespace sgsys-vmN
                        with eth0 198.18.0.(10+N) and fdac:25::(10+N)
    sgsys-sink          the SMTP sink (smtpguard.lab.sink) at 198.18.0.2 / fdac:25::2
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
from pathlib import Path

from pyroute2 import IPRoute, netns

from smtpguard.daemon.netns import enter
from smtpguard.lab.traffic import SendPlan, send

P = "sgsys"
BR = f"{P}-br"
SINK_NS = f"{P}-sink"
SINK4, SINK6 = "198.18.0.2", "fdac:25::2"
READY = Path(f"/run/{P}-sink.ready")
PIDFILE = Path(f"/run/{P}-sink.pid")
NODAD = 0x02


def vm_ns(n: int) -> str:
    return f"{P}-vm{n}"


def up(vms: int) -> None:
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=BR):
            ipr.link("add", ifname=BR, kind="bridge")
        br = ipr.link_lookup(ifname=BR)[0]
        ipr.link("set", index=br, state="up")
        if SINK_NS not in netns.listnetns():
            netns.create(SINK_NS)
            ipr.link("add", ifname=f"{P}-sink0", kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": SINK_NS})
            ipr.link("set", index=ipr.link_lookup(ifname=f"{P}-sink0")[0], master=br,
                     state="up")
            _addresses(SINK_NS, SINK4, SINK6)
            _start_sink()
        for n in range(1, vms + 1):
            ns = vm_ns(n)
            if ns in netns.listnetns():
                continue
            netns.create(ns)
            host = f"veth-{P}{n}"
            ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=host)[0]
            ipr.link("set", index=idx, ifalias=f"vm{n}")
            ipr.link("set", index=idx, master=br, state="up")
            _addresses(ns, f"198.18.0.{10 + n}", f"fdac:25::{10 + n:x}")
    print(json.dumps({"vms": [f"vm{n}" for n in range(1, vms + 1)]}))


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


def do_send(vm: int, connections: int, port: int, ipv6: bool, timeout: float) -> None:
    enter(vm_ns(vm))
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
    with IPRoute() as ipr:
        for idx in ipr.link_lookup(ifname=BR):
            ipr.link("del", index=idx)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up").add_argument("--vms", type=int, default=2)
    s = sub.add_parser("send")
    s.add_argument("vm", type=int)
    s.add_argument("--connections", type=int, default=5)
    s.add_argument("--port", type=int, default=25)
    s.add_argument("--ipv6", action="store_true")
    s.add_argument("--timeout", type=float, default=5.0)
    sub.add_parser("down")
    args = ap.parse_args()
    if args.cmd == "up":
        up(args.vms)
    elif args.cmd == "send":
        do_send(args.vm, args.connections, args.port, args.ipv6, args.timeout)
    else:
        down()


if __name__ == "__main__":
    main()
