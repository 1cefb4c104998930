"""`smtpguard run`: the agent (the systemd service's command), its
--cleanup and its --dry-run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smtpguard.defaults import DEFAULT_METRICS, DEFAULT_PIN_DIR, DEFAULT_SOCKET, DEFAULT_STATE_DIR

Subparsers = argparse._SubParsersAction


def add_parser(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
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


def command(args: argparse.Namespace) -> int:
    from smtpguard.datapath.loader import CACHE_DIR, Datapath, Sizes, ensure_bpffs

    if args.netns:
        from smtpguard.daemon.netns import enter

        enter(args.netns)
    datapath = None
    if not (args.cleanup or args.dry_run):
        # A build neither pinned nor stored in the state dir compiles (about a
        # second) while the rest of the agent is imported and set up.
        ensure_bpffs(Path("/sys/fs/bpf"))
        datapath = Datapath(args.pin_dir, Sizes(conn_table=args.conn_table_size),
                            cache_dir=args.state_dir / CACHE_DIR)
        datapath.prepare()
    from smtpguard.daemon.agent import Agent, AgentConfig
    from smtpguard.daemon.cleanup import cleanup
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
