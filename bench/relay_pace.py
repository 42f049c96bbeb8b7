"""Throughput against a relay that takes ~20 ms per reply, by pool size and sending pace.

``python bench/relay_pace.py [--messages 400] [--delay 0.02]`` starts an aiosmtpd relay in
its own process that waits ``--delay`` before answering MAIL, RCPT and DATA (a remote
relay's round trip plus its work), then sends ``--messages`` through
:class:`~mailer.smtp.pool.SmtpTransport` with several ``MAILER_SMTP_POOL_SIZE`` values,
and through :class:`~mailer.smtp.paced.PacedTransport` with a few pace limits, printing
messages per second for each. One transaction costs about three replies, so one
connection carries at most about 1 / (3 x delay) messages a second.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailer.smtp.limits import parse_domain_limits
from mailer.smtp.pace import MemoryPace, PaceLimits
from mailer.smtp.paced import PacedTransport
from mailer.smtp.pool import SmtpTransport
from mailer.smtp.replies import Outcome
from tests.smtp_servers import sample_envelope


class SlowHandler:
    """Answers every transaction step after ``delay`` seconds and keeps nothing."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        """Accept the sender after the delay."""
        await asyncio.sleep(self.delay)
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        """Accept the recipient after the delay."""
        await asyncio.sleep(self.delay)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Accept the message after the delay."""
        await asyncio.sleep(self.delay)
        return "250 2.0.0 OK queued"


def _serve(delay: float, ports: Any, stop: Any) -> None:
    from tests.smtp_servers import _EphemeralController

    controller = _EphemeralController(SlowHandler(delay), hostname="127.0.0.1", port=0,
                                      server_hostname="bench-relay")
    controller.start()
    ports.put(controller.port)
    stop.wait()
    controller.stop()


async def _measure(transport: SmtpTransport | PacedTransport, count: int) -> float:
    # Domains spread like a real list: three big providers and a long tail.
    domains = ["gmail.com", "outlook.com", "yahoo.com", "tail1.example", "tail2.example"]
    envelopes = [sample_envelope(n, to=f"u{n}@{domains[n % len(domains)]}")
                 for n in range(count)]
    began = time.perf_counter()
    results = await transport.send_many(envelopes)
    elapsed = time.perf_counter() - began
    await transport.close()
    assert all(r.outcome is Outcome.SENT for r in results), {r.response for r in results}
    return count / elapsed


def main() -> None:
    """Run every configuration and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--delay", type=float, default=0.02)
    args = parser.parse_args()
    ports: Any = multiprocessing.Queue()
    stop = multiprocessing.Event()
    relay = multiprocessing.Process(target=_serve, args=(args.delay, ports, stop))
    relay.start()
    try:
        port = ports.get(timeout=10)
        print(f"relay adds {args.delay * 1000:.0f} ms per reply; {args.messages} messages")
        print(f"{'configuration':44} {'msg/s':>7}")
        for size in (1, 2, 4, 8, 16, 32, 64):
            rate = asyncio.run(_measure(SmtpTransport("127.0.0.1", port, pool_size=size),
                                        args.messages))
            print(f"{f'pool {size}, no pace':44} {rate:7.1f}")
        for size, max_rate, domains in ((16, 100.0, ""), (32, 100.0, ""),
                                        (32, None, "*=200/s:4"), (32, None, "*=200/s:8"),
                                        (64, 300.0, "*=200/s:8")):
            limits = PaceLimits(max_rate=max_rate, domains=parse_domain_limits(domains))
            paced = PacedTransport(SmtpTransport("127.0.0.1", port, pool_size=size),
                                   MemoryPace(limits))
            rate = asyncio.run(_measure(paced, args.messages))
            label = f"pool {size}, max rate {max_rate or '-'}, domains {domains or '-'}"
            print(f"{label:44} {rate:7.1f}")
    finally:
        stop.set()
        relay.join(timeout=10)


if __name__ == "__main__":
    main()
