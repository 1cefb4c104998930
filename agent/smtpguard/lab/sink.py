"""The lab's mail sink: a real SMTP server (aiosmtpd) that accepts and
discards, on every address of its namespace, IPv4 and IPv6.

    python -m smtpguard.lab.sink --netns NS --ports 25,465,587 --ready FILE

Port 465 speaks plain SMTP here (no TLS): the lab tests counting, not TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP


class Discard:
    """aiosmtpd handler: accept every message and drop it."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 accepted (smtpguard lab sink)"


# Hundreds of clients connect at once. asyncio's create_server() calls
# listen() again with its own backlog (100 unless told), and past that the
# kernel answers with SYN cookies, whose ACK it then drops while the accept
# queue is full: the client believes it is connected and waits for a banner
# that never comes (a server-speaks-first protocol never retransmits).
BACKLOG = 4096


def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
    sock.bind(("::", port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


async def serve(ports: list[int], ready: Path | None) -> None:
    loop = asyncio.get_running_loop()
    handler = Discard()
    servers = [
        await loop.create_server(
            lambda: SMTP(handler, hostname="sink.lab", ident="smtpguard-lab-sink"),
            sock=_listener(port),
            backlog=BACKLOG,
        )
        for port in ports
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.write_text("ready\n")
    await stop.wait()
    for s in servers:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="smtpguard-lab-sink")
    ap.add_argument("--netns", help="network namespace to serve in")
    ap.add_argument("--ports", default="25,465,587")
    ap.add_argument("--ready", type=Path, help="file written once listening")
    args = ap.parse_args()
    # Hundreds of sessions at once: the soft 1024-descriptor default is no
    # ceiling the lab should depend on (a shell or CI harness may set less).
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.netns:
        from smtpguard.daemon.netns import enter

        enter(args.netns)
    asyncio.run(serve([int(p) for p in args.ports.split(",")], args.ready))


if __name__ == "__main__":
    main()
