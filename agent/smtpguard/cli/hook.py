"""`smtpguard libvirt-hook`: libvirt's qemu hook tells the agent a starting
domain's taps before QEMU runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smtpguard.defaults import DEFAULT_SOCKET
from smtpguard.errors import SmtpguardError

Subparsers = argparse._SubParsersAction


def add_parser(sub: Subparsers[argparse.ArgumentParser]) -> None:
    hook = sub.add_parser(
        "libvirt-hook", help="libvirt's qemu hook (install as /etc/libvirt/hooks/qemu.d/"
        "smtpguard): tells the agent a starting domain's taps before QEMU runs")
    hook.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                      help=f"the agent's control socket (default {DEFAULT_SOCKET})")
    hook.add_argument("--timeout", type=float, default=5.0,
                      help="seconds to wait for the agent (default 5); a domain is never "
                      "kept from starting")
    hook.add_argument("domain")
    hook.add_argument("op")
    hook.add_argument("rest", nargs="*", help="sub-operation and extra argument")


def command(args: argparse.Namespace) -> int:
    """Exit 0 whatever happens: an agent that is down or slow must not stop
    domains from starting (its default policy still covers the taps)."""
    from smtpguard.api.control import request
    from smtpguard.inventory.hook import START_OPS, STOP_OPS

    if args.op not in START_OPS + STOP_OPS:
        return 0
    xml = sys.stdin.read()
    try:
        reply = request(args.socket, {"cmd": "libvirt_hook", "op": args.op, "xml": xml},
                        timeout=args.timeout)
    except (SmtpguardError, OSError) as exc:
        print(f"smtpguard libvirt-hook: {args.domain} {args.op}: {exc}", file=sys.stderr)
        return 0
    if reply.get("interfaces"):
        print(f"smtpguard: {args.domain} on {', '.join(reply['interfaces'])}: "
              f"{reply.get('state')}", file=sys.stderr)
    return 0
