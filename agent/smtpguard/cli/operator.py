"""The operator's commands over the agent's control socket: status, flags,
block, throttle, release, reload, explain, incidents."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import time
from pathlib import Path

from smtpguard.defaults import DEFAULT_SOCKET
from smtpguard.errors import SmtpguardError

Subparsers = argparse._SubParsersAction


COMMANDS = ("status", "flags", "block", "throttle", "release", "reload", "explain",
            "incidents")


def add_parsers(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    def op(name: str, helptext: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext, parents=[common])
        p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                       help=f"the agent's control socket (default {DEFAULT_SOCKET})")
        return p

    for name, helptext in (("status", "every VM: class, attempts, destinations, state"),
                           ("flags", "the VMs that are flagged, throttled or blocked")):
        op(name, helptext).add_argument("--json", action="store_true")
    block = op("block", "block a VM's SMTP (all ports but the relays)")
    block.add_argument("vm", help="the VM: its id, name, UUID or one of its interfaces")
    block.add_argument("--for", dest="duration", required=True,
                       help="how long, e.g. 24h (automatic decisions cannot lift it)")
    block.add_argument("--reason", required=True)
    throttle = op("throttle", "hold a VM's SMTP to its class's throttle ceiling")
    throttle.add_argument("vm", help="the VM: its id, name, UUID or one of its interfaces")
    throttle.add_argument("--for", dest="duration", required=True,
                          help="how long, e.g. 1h (automatic decisions cannot lift it)")
    throttle.add_argument("--reason", required=True)
    release = op("release", "lift a VM's block or throttle")
    release.add_argument("vm", help="the VM: its id, name, UUID or one of its interfaces")
    release.add_argument("--for", dest="duration", default="1h",
                         help="immunity from automatic actions afterwards (default 1h)")
    release.add_argument("--reason", default="")
    op("reload", "re-read the policy (as SIGHUP does) and say whether it was applied")
    exp = op("explain", "what a VM may do, its state, why and until when")
    exp.add_argument("vm", help="the VM: its id, name, UUID or one of its interfaces")
    exp.add_argument("--json", action="store_true")
    inc = op("incidents", "incidents and their evidence: `incidents [--vm VM] [--since 24h]`, "
             "`incidents show ID`")
    inc.add_argument("show", nargs="?", choices=["show"], help="print one incident in full")
    inc.add_argument("id", nargs="?", type=int, help="the incident (with show)")
    inc.add_argument("--vm", help="only this VM's")
    inc.add_argument("--since", default="", help="only those opened within, e.g. 24h "
                     "(open ones always show)")
    inc.add_argument("--json", action="store_true")


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    left = t - time.time()
    return f"{time.strftime('%H:%M:%S', time.localtime(t))} ({left / 60:.0f}m)" \
        if left > 0 else time.strftime("%H:%M:%S", time.localtime(t))


def command(args: argparse.Namespace) -> int:
    from smtpguard.api.control import request

    who = os.environ.get("SUDO_USER") or getpass.getuser()
    req: dict[str, object] = {"cmd": args.command, "who": who}
    if args.command in ("block", "throttle", "release"):
        req.update(vm=args.vm, reason=args.reason)
        req["for"] = args.duration
    if args.command in ("explain", "incidents"):
        return _evidence(args, req)
    reply = request(args.socket, req)
    if getattr(args, "json", False):
        print(json.dumps(reply["vms"], indent=2))
        return 0
    if args.command in ("status", "flags"):
        head = (f"{'VM':<16} {'INTERFACE':<14} {'ATTACH':<10} {'CLASS':<10} {'PORT25':<6} "
                f"{'1m':>6} {'1h':>7} {'DEST 1m':>7} {'DEST 1h':>7} {'STATE':<9} "
                f"{'UNTIL':<16} REASON")
        print(head)
        for r in reply["vms"]:
            print(f"{(r.get('name') or r['vm'])[:16]:<16} "
                  f"{','.join(r['interfaces'])[:14] or '-':<14} "
                  f"{(r.get('attachment') or '-')[:10]:<10} "
                  f"{r['class'][:10]:<10} {r['port25']:<6} {r['attempts_1m']:>6} "
                  f"{r['attempts_1h']:>7} {r['destinations_1m']:>7.0f} "
                  f"{r['destinations_1h']:>7.0f} {r['state']:<9} {_when(r['until']):<16} "
                  f"{r['reason'] if r['state'] != 'ok' else ''}")
        return 0
    if args.command in ("block", "throttle", "release"):
        print(f"{reply.get('name') or reply['vm']}: {reply['state']}, until "
              f"{_when(reply['until'])} "
              f"({reply['reason']})")
    if args.command == "reload":
        print(f"policy applied, generation {reply['policy_generation']}")
    return 0


def _evidence(args: argparse.Namespace, req: dict[str, object]) -> int:
    from smtpguard.api.control import request
    from smtpguard.respond.incidents import render

    if args.command == "explain":
        req["vm"] = args.vm
        e = request(args.socket, req)["explain"]
        if args.json:
            print(json.dumps(e, indent=2))
            return 0
        from smtpguard.policy.explain import render as render_policy

        print(render_policy(e))
        print(f"  plugged in    {e.get('attachment') or '-'}; coverage {e.get('coverage')}")
        state = e["state"] + (f" until {_when(e['until'])}" if e["until"] else "")
        if e["state"] != "ok" and not e["enforced"]:
            state += " (audit mode: not enforced)"
        print(f"  state now     {state}, since {_when(e['since'])}")
        if e["state"] != "ok":
            print(f"  because       {e['reason']} (by {e['actor']})")
            if e["rule"]:
                print(f"  rule          {e['rule']['text']} ({e['rule']['where']})")
        top = e["activity"]["top_destinations"][:5]
        print(f"  activity      {e['activity']['attempts']} attempts to "
              f"{e['activity']['destinations']} destinations since its last fresh start"
              + (": " + ", ".join(f"{d['address']} ({d['attempts']})" for d in top)
                 if top else ""))
        if e["incident"]:
            i = e["incident"]
            print(f"  incident      {i['id']} ({'open' if not i['closed'] else 'closed'}): "
                  f"smtpguard incidents show {i['id']}")
        return 0
    if args.show:
        if args.id is None:
            raise SmtpguardError("incidents show: which incident? (an id)")
        req.update(cmd="incident", id=args.id)
        inc = request(args.socket, req)["incident"]
        print(json.dumps(inc, indent=2) if args.json else render(inc))
        return 0
    since = 0.0
    if args.since:
        from smtpguard.policy.units import parse_duration

        try:
            since = time.time() - parse_duration(args.since)
        except ValueError as exc:
            raise SmtpguardError(f"--since: {exc}") from exc
    req.update(vm=args.vm, since=since)
    rows = request(args.socket, req)["incidents"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':>6} {'VM':<16} {'OPENED':<16} {'CLOSED':<16} {'STATE':<9} {'MODE':<7} REASON")
    for r in rows:
        print(f"{r['id']:>6} {r['vm'][:16]:<16} {_when(r['opened']):<16} "
              f"{_when(r['closed']) if r['closed'] else 'open':<16} {r['state']:<9} "
              f"{r['mode'] or '-':<7} {r['reason']}")
    return 0
