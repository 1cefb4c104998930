"""The smtpguard command line."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from pathlib import Path

from smtpguard import __version__, logs
from smtpguard.errors import SmtpguardError

EPILOG = "Docs: README.md and docs/. Every command exits non-zero with a one-line error on failure."


def _parser() -> argparse.ArgumentParser:
    from smtpguard.defaults import (
        DEFAULT_METRICS,
        DEFAULT_PIN_DIR,
        DEFAULT_SOCKET,
        DEFAULT_STATE_DIR,
    )

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warning", "error"],
                        help="log level (default info)")
    ap = argparse.ArgumentParser(
        prog="smtpguard", description="Outbound-SMTP abuse guard for hypervisors.",
        epilog=EPILOG, parents=[common])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent (the systemd service's command)",
                         parents=[common],
                         description="Attach the SMTP classifier to every VM-facing "
                         "interface and report per-VM counts. A plain stop leaves filters "
                         "and pinned maps in the kernel (counting goes on); --cleanup "
                         "removes them.")
    run.add_argument("--policy", type=Path, help="policy YAML file or directory (default: "
                     "the built-in default); reloaded on SIGHUP and when it changes")
    run.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                     help=f"agent state (default {DEFAULT_STATE_DIR})")
    run.add_argument("--pin-dir", type=Path, default=DEFAULT_PIN_DIR,
                     help=f"bpffs directory for this agent's maps (default {DEFAULT_PIN_DIR})")
    run.add_argument("--metrics-addr", default=DEFAULT_METRICS,
                     help=f"HOST:PORT for /metrics, '' to disable (default {DEFAULT_METRICS})")
    run.add_argument("--netns", help="run inside this named network namespace (the lab)")
    run.add_argument("--control-socket", default=str(DEFAULT_SOCKET),
                     help=f"unix socket for the operator CLI, '' to disable "
                     f"(default {DEFAULT_SOCKET})")
    run.add_argument("--log-interval", type=float, default=60.0,
                     help="seconds between per-VM count logs (default 60)")
    run.add_argument("--conn-table-size", type=int, default=262144,
                     help="attempts remembered for SYN dedup; size for rate x retry "
                     "window (default 262144)")
    run.add_argument("--backend", choices=["auto", "nftables", "iptables"],
                     help="firewall that enforces (default: the policy's enforcement.backend, "
                     "auto: nftables, or iptables-legacy where nftables is unavailable and "
                     "legacy tables are already in use)")
    run.add_argument("--cleanup", action="store_true",
                     help="turn everything off: remove every smtpg_* tc filter, the pinned "
                     "maps, the smtpguard nftables tables and SMTPG* iptables chains, then "
                     "exit")
    run.add_argument("--dry-run", action="store_true",
                     help="print the rules the policy gives and exit (nft -f syntax; "
                     "iptables-restore syntax with --backend iptables)")
    run.add_argument("--no-enforce", action="store_true",
                     help="count and report only; leave the firewall alone")

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
    sub.add_parser("version", help="print the version")
    return ap


def _libvirt_hook(args: argparse.Namespace) -> int:
    """Exit 0 whatever happens: an agent that is down or slow must not stop
    domains from starting (its default policy still covers the taps)."""
    from smtpguard.control import request
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


def _run(args: argparse.Namespace) -> int:
    from smtpguard.datapath.loader import CACHE_DIR, Datapath, Sizes, ensure_bpffs

    if args.netns:
        from smtpguard.netns import enter

        enter(args.netns)
    datapath = None
    if not (args.cleanup or args.dry_run):
        # A build neither pinned nor stored in the state dir compiles (about a
        # second) while the rest of the agent is imported and set up.
        ensure_bpffs(Path("/sys/fs/bpf"))
        datapath = Datapath(args.pin_dir, Sizes(conn_table=args.conn_table_size),
                            cache_dir=args.state_dir / CACHE_DIR)
        datapath.prepare()
    from smtpguard.agent import Agent, AgentConfig, cleanup
    from smtpguard.policy import load_path

    cfg = AgentConfig(
        policy_path=args.policy, state_dir=args.state_dir, pin_dir=args.pin_dir,
        metrics_addr=args.metrics_addr or None, log_interval=args.log_interval,
        sizes=Sizes(conn_table=args.conn_table_size), enforce=not args.no_enforce,
        control_socket=Path(args.control_socket) if args.control_socket else None,
        backend=args.backend,
    )
    if args.cleanup:
        cleanup(cfg)
        return 0
    if args.dry_run:
        from smtpguard.enforce.desired import Desired

        desired = Desired(load_path(args.policy).policy)
        if (args.backend or desired.policy.enforcement.backend) == "iptables":
            from smtpguard.enforce.iptables_render import FAMILIES, restore_text

            sys.stdout.write("".join(restore_text(desired, fam) for fam in FAMILIES))
            return 0
        from smtpguard.enforce.nftables import dry_run, probe

        sys.stdout.write(dry_run(desired, probe()))
        return 0
    agent = Agent(cfg, load_path(args.policy), datapath=datapath)
    agent.install_signals()
    agent.run()
    return 0


def _policy(args: argparse.Namespace) -> int:
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


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    left = t - time.time()
    return f"{time.strftime('%H:%M:%S', time.localtime(t))} ({left / 60:.0f}m)" \
        if left > 0 else time.strftime("%H:%M:%S", time.localtime(t))


def _operator(args: argparse.Namespace) -> int:
    from smtpguard.control import request

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
    from smtpguard.control import request
    from smtpguard.incidents import render

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


def _lab(args: argparse.Namespace) -> int:
    from smtpguard.lab import topology

    lab = topology.Lab(args.name)
    if args.lab_command == "up":
        topology.up(lab, args.vms, args.routed, args.switched)
        print(f"lab {lab.prefix}: hypervisor {lab.hv}, sink {lab.sink}, "
              f"VMs {lab.vms() + lab.vms('rvm')}")
    elif args.lab_command == "down":
        topology.down(lab)
    elif args.lab_command == "send":
        from smtpguard.lab.traffic import SendPlan, send
        from smtpguard.netns import enter

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Commands that print for people keep stdout for that; logs go to stderr.
    quiet = args.command in ("policy", "version", "status", "flags", "block", "throttle",
                             "release", "reload", "explain", "incidents",
                             "libvirt-hook") or (
        args.command == "lab" and args.lab_command in ("send", "demo"))
    logs.configure(getattr(args, "log_level", "info"), sys.stderr if quiet else None)
    try:
        if args.command == "version":
            print(f"smtpguard {__version__}")
            return 0
        if args.command == "run":
            return _run(args)
        if args.command == "policy":
            return _policy(args)
        if args.command == "lab":
            return _lab(args)
        if args.command in ("status", "flags", "block", "throttle", "release", "reload",
                            "explain", "incidents"):
            return _operator(args)
        if args.command == "libvirt-hook":
            return _libvirt_hook(args)
    except SmtpguardError as exc:
        print(f"smtpguard: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"smtpguard: {exc} (run as root)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Start-up failures end in one line; the traceback is for --log-level debug.
        logs.get().debug("cli.crashed", exc_info=True)
        print(f"smtpguard: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
