"""The smtpguard command line: the parser, built from each command group's
module, and the dispatch."""

from __future__ import annotations

import argparse
import sys

from smtpguard import __version__, logs
from smtpguard.cli import hook, lab, operator, policy, run
from smtpguard.errors import SmtpguardError

EPILOG = ("Docs: man smtpguard, man smtpguard-policy; README.md and docs/. "
          "Every command exits non-zero with a one-line error on failure.")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["debug", "info", "warning", "error"],
                        help="log level (default info)")
    ap = argparse.ArgumentParser(
        prog="smtpguard", description="Outbound-SMTP abuse guard for hypervisors.",
        epilog=EPILOG, parents=[common])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parser(sub, common)
    policy.add_parser(sub)
    lab.add_parser(sub)
    operator.add_parsers(sub, common)
    hook.add_parser(sub)
    sub.add_parser("version", help="print the version")
    return ap


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
            return run.command(args)
        if args.command == "policy":
            return policy.command(args)
        if args.command == "lab":
            return lab.command(args)
        if args.command in operator.COMMANDS:
            return operator.command(args)
        if args.command == "libvirt-hook":
            return hook.command(args)
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
