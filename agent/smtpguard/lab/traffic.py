"""Drive SMTP connections from a lab VM (run inside the VM's namespace)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

from smtpguard.lab.topology import dest_addr


@dataclass(frozen=True)
class SendPlan:
    connections: int
    rate: float = 0.0  # new connections a second; 0 = as fast as allowed
    destinations: int = 1
    port: int = 25
    family: int = 4
    dialog: str = "quit"  # "quit": banner, EHLO, QUIT; "mail": a whole message; "connect"
    concurrency: int = 256
    timeout: float = 5.0
    to: str | None = None  # one explicit destination instead of the sink's range


async def _one(host: str, plan: SendPlan) -> str:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, plan.port), plan.timeout)
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, OSError):
        return "no_answer"
    try:
        if plan.dialog != "connect":
            await asyncio.wait_for(reader.readline(), plan.timeout)
            lines = [b"EHLO vm.lab\r\n"]
            if plan.dialog == "mail":
                lines += [b"MAIL FROM:<vm@lab.invalid>\r\n", b"RCPT TO:<rcpt@sink.lab>\r\n",
                          b"DATA\r\n", b"Subject: lab\r\n\r\nhello\r\n.\r\n"]
            for line in [*lines, b"QUIT\r\n"]:
                writer.write(line)
            await writer.drain()
            await asyncio.wait_for(reader.read(), plan.timeout)
        return "completed"
    except (TimeoutError, OSError):
        return "failed"
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def send(plan: SendPlan) -> dict[str, int]:
    """Open plan.connections connections, spread over plan.destinations
    addresses; returns outcome -> count."""
    sem = asyncio.Semaphore(plan.concurrency)
    outcomes: Counter[str] = Counter()
    interval = 1.0 / plan.rate if plan.rate > 0 else 0.0
    start = time.monotonic()

    async def worker(i: int) -> None:
        async with sem:
            host = plan.to or dest_addr(i % plan.destinations, plan.family)
            outcomes[await _one(host, plan)] += 1

    tasks = []
    for i in range(plan.connections):
        if interval:
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await sem.acquire()
        sem.release()
        tasks.append(asyncio.create_task(worker(i)))
    await asyncio.gather(*tasks)
    return dict(outcomes)


def fan_out(netns: str, n: int, rate: float, port: int = 587, first: int = 1000) -> list[float]:
    """From a VM's namespace, SYNs to n distinct destinations (dest_addr(first)
    onwards) at `rate` a second, without waiting for answers; returns the
    wall-clock time each was sent (for reaction-time measurements)."""
    import socket

    from smtpguard.daemon.netns import run_in

    def run() -> list[float]:
        socks, times = [], []
        t0 = time.monotonic()
        for i in range(n):
            # On a schedule (not a fixed sleep after each), so the rate holds
            # up to what one Python thread can send.
            ahead = t0 + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((dest_addr(first + i), port))
            times.append(time.time())
            socks.append(s)
        time.sleep(0.5)
        for s in socks:
            s.close()
        return times

    return run_in(netns, run)
