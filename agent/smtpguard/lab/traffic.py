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
