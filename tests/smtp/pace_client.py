"""A sending-pace client run as its own OS process by tests/smtp/test_pace.py.

``python -m tests.smtp.pace_client URL PREFIX DOMAIN LIMITS MAX_RATE COUNT TASKS HOLD START``
acquires ``COUNT`` permits for ``DOMAIN`` with ``TASKS`` concurrent asyncio tasks, holds
each for up to ``HOLD`` seconds, and prints one JSON list of ``[granted, released]``
wall-clock times, so the parent can merge what several processes saw.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from mailer.smtp.limits import parse_domain_limits, parse_max_rate
from mailer.smtp.pace import PaceLimits
from mailer.smtp.pace_redis import RedisPace


async def _main(argv: list[str]) -> list[tuple[float, float]]:
    url, prefix, domain, domain_limits, max_rate, count, tasks, hold, start = argv
    limits = PaceLimits(max_rate=parse_max_rate(max_rate or None),
                        domains=parse_domain_limits(domain_limits))
    pace = RedisPace.from_url(url, limits, prefix=prefix)
    events: list[tuple[float, float]] = []
    rng = random.Random()

    async def worker(n: int) -> None:
        for _ in range(n):
            permit = await pace.acquire(domain, timeout=60)
            granted = time.time()
            if float(hold) > 0:
                await asyncio.sleep(rng.uniform(float(hold) / 3, float(hold)))
            events.append((granted, time.time()))
            await pace.release(permit)

    # Both processes start together, so their acquisitions really compete.
    await asyncio.sleep(max(0.0, float(start) - time.time()))
    share, extra = divmod(int(count), int(tasks))
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(int(tasks))))
    await pace.close()
    return events


if __name__ == "__main__":
    json.dump(asyncio.run(_main(sys.argv[1:])), sys.stdout)
