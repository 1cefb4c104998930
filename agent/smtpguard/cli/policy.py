"""`smtpguard policy check|explain`: policy files, without an agent."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smtpguard.errors import SmtpguardError

Subparsers = argparse._SubParsersAction


def add_parser(sub: Subparsers[argparse.ArgumentParser]) -> None:
    pol = sub.add_parser("policy", help="policy files").add_subparsers(
        dest="policy_command", required=True, metavar="SUBCOMMAND")
    check = pol.add_parser("check", help="validate policy files without touching the kernel",
                           description="Exit 0 when every FILE (or directory) is valid, 1 "
                           "otherwise, printing FILE:LINE:COL: field: message per error.")
    check.add_argument("files", type=Path, nargs="+", metavar="FILE")
    expl = pol.add_parser("explain", help="the effective policy for one VM, and why",
                          description="Print the class a VM gets, which rule placed it "
                          "there, and what that class allows.")
    expl.add_argument("file", type=Path, metavar="FILE", help="policy file or directory")
    expl.add_argument("--vm", required=True, help="VM name")
    expl.add_argument("--interface", help="its interface name")
    expl.add_argument("--ip", action="append", default=[], help="an address it uses "
                      "(repeatable)")
    expl.add_argument("--mac", help="its MAC address")
    expl.add_argument("--tenant", help="its tenant label")
    expl.add_argument("--json", action="store_true", help="machine-readable output")


def command(args: argparse.Namespace) -> int:
    from smtpguard.policy import load_path

    if args.policy_command == "explain":
        import ipaddress

        from smtpguard.policy.explain import explain, render
        from smtpguard.policy.membership import VmFacts

        for ip in args.ip:
            try:
                ipaddress.ip_address(ip)
            except ValueError as exc:
                raise SmtpguardError(f"--ip {ip}: not an IP address") from exc
        e = explain(load_path(args.file), VmFacts(args.vm, args.interface, args.mac,
                                                  tuple(args.ip), args.tenant))
        print(json.dumps(e, indent=2) if args.json else render(e))
        return 0
    bad = 0
    for f in args.files:
        try:
            load_path(f)
        except SmtpguardError as exc:
            print(exc, file=sys.stderr)
            bad += 1
        else:
            print(f"{f}: ok")
    return 1 if bad else 0
