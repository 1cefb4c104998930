"""`smtpguard lab up|send|down|demo`: a hypervisor in network namespaces."""

from __future__ import annotations

import argparse
import asyncio
import json

from smtpguard.errors import SmtpguardError

Subparsers = argparse._SubParsersAction


def add_parser(sub: Subparsers[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="a hypervisor in network namespaces").add_subparsers(
        dest="lab_command", required=True, metavar="SUBCOMMAND")
    for name, helptext in (("up", "build the lab (VMs, bridge, SMTP sink)"),
                           ("send", "open SMTP connections from a lab VM"),
                           ("down", "remove every namespace of the lab"),
                           ("demo", "lab + agent + a good VM and a spam bot, live table")):
        p = lab.add_parser(name, help=helptext)
        p.add_argument("--name", default="sglab", help="lab prefix (default sglab)")
        if name == "up":
            p.add_argument("--vms", type=int, default=3, help="VMs on the bridge (vm1..)")
            p.add_argument("--routed", type=int, default=0,
                           help="VMs on routed taps (rvm1..)")
            p.add_argument("--switched", type=int, default=0,
                           help="VMs on a device switched in its rx_handler, as an Open "
                           "vSwitch port is (svm1..; enforced with attachment: ovs)")
        if name == "send":
            p.add_argument("vm", help="vm1, vm2, ... (rvm1, svm1, ...)")
            p.add_argument("--connections", type=int, required=True)
            p.add_argument("--rate", type=float, default=0.0,
                           help="new connections a second (default: as fast as possible)")
            p.add_argument("--destinations", type=int, default=1)
            p.add_argument("--port", type=int, default=25)
            p.add_argument("--ipv6", action="store_true")
            p.add_argument("--dialog", choices=["quit", "mail", "connect"], default="quit")
            p.add_argument("--timeout", type=float, default=5.0)
            p.add_argument("--to", help="one destination address (e.g. a relay) instead of "
                           "the sink's range")
        if name == "demo":
            p.add_argument("--duration", type=float, default=0.0,
                           help="stop after this many seconds (default: until Ctrl-C)")


def command(args: argparse.Namespace) -> int:
    from smtpguard.lab import topology

    lab = topology.Lab(args.name)
    if args.lab_command == "up":
        topology.up(lab, args.vms, args.routed, args.switched)
        print(f"lab {lab.prefix}: hypervisor {lab.hv}, sink {lab.sink}, "
              f"VMs {lab.vms() + lab.vms('rvm')}")
    elif args.lab_command == "down":
        topology.down(lab)
    elif args.lab_command == "send":
        from smtpguard.daemon.netns import enter
        from smtpguard.lab.traffic import SendPlan, send

        have = lab.vms() + lab.vms("rvm") + lab.vms("svm")
        if args.vm not in have:
            raise SmtpguardError(f"no VM {args.vm} in lab {lab.prefix} (have {have})")
        plan = SendPlan(connections=args.connections, rate=args.rate,
                        destinations=max(1, args.destinations), port=args.port,
                        family=6 if args.ipv6 else 4, dialog=args.dialog, timeout=args.timeout,
                        to=args.to)
        enter(lab.vm_ns(args.vm))
        print(json.dumps({"vm": args.vm, "port": plan.port, "family": plan.family,
                          "outcomes": asyncio.run(send(plan))}))
    elif args.lab_command == "demo":
        from smtpguard.lab.demo import demo

        demo(lab, args.duration)
    return 0
