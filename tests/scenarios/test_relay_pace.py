"""The sending pace end to end: real worker processes, real Redis, a real aiosmtpd relay (SPEC 5).

- ``MAILER_SMTP_MAX_RATE=20`` with two worker processes: the relay sees about 20 messages
  a second in total, and no domain ever has more transactions open than its limit.
- A relay that throttles one domain (``421 4.7.0``): other domains' mail flows, the
  throttled domain's mail all arrives later, and the throttled replies stay few.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

from tests.conftest import WorkerProcess, auth, base_env, wait_for
from tests.services import RedisServer
from tests.smtp_servers import Recorder, running_smtp_server


class PacedRelay(Recorder):
    """Records when each message arrives and how many transactions each domain has open;
    throttles ``throttle_domain`` with 421 4.7.0 for ``throttle_seconds`` after its first RCPT."""

    def __init__(self, hold: float = 0.02, throttle_domain: str | None = None,
                 throttle_seconds: float = 0.0) -> None:
        super().__init__()
        self.hold = hold
        self.throttle_domain = throttle_domain
        self.throttle_seconds = throttle_seconds
        self.throttle_started: float | None = None
        self.throttled = 0
        self.arrivals: list[tuple[float, str]] = []
        self.open: Counter[str] = Counter()
        self.max_open: Counter[str] = Counter()
        self._guard = threading.Lock()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """Throttle one domain for a while; count open transactions per domain."""
        domain = address.rpartition("@")[2]
        with self._guard:
            if domain == self.throttle_domain:
                now = time.monotonic()
                self.throttle_started = self.throttle_started or now
                if now - self.throttle_started < self.throttle_seconds:
                    self.throttled += 1
                    return "421 4.7.0 Try again later, closing connection"
            self.open[domain] += 1
            self.max_open[domain] = max(self.max_open[domain], self.open[domain])
        session.domain = domain
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Take the message after a short hold, as a real relay's processing time."""
        await asyncio.sleep(self.hold)
        status = await super().handle_DATA(server, session, envelope)
        with self._guard:
            self.arrivals.append((time.monotonic(), session.domain))
            self.open[session.domain] -= 1
        return status


def _accept(env: dict[str, str], addresses: list[str]) -> tuple[Any, list[str]]:
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.keys import create_key
    from mailer.runtime import Runtime

    rt = Runtime.from_settings(Settings.from_environ(env))
    with rt.engine.begin() as conn:
        key = create_key(conn, "pace", ["messages:transactional"])
    ids: list[str] = []
    with TestClient(create_app(rt)) as client:
        for start in range(0, len(addresses), 500):
            batch = [{"template": "registration_confirmation", "to": to,
                      "data": {"name": "P", "confirm_url": "https://example.test/c"}}
                     for to in addresses[start:start + 500]]
            response = client.post("/v1/messages/batch", json={"messages": batch},
                                   headers=auth(key))
            assert response.status_code == 202, response.text
            ids += [r["id"] for r in response.json()["results"]]
    return rt, ids


def _statuses(rt: Any, ids: list[str]) -> Counter[str]:
    from sqlalchemy import select

    from mailer.store.schema import messages

    with rt.engine.connect() as conn:
        return Counter(str(r.status) for r in conn.execute(
            select(messages.c.status).where(messages.c.id.in_(ids))))


def _tag() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def test_max_rate_holds_across_two_worker_processes_and_domain_concurrency(
    db_url: str, redis: RedisServer
) -> None:
    # Given a relay, MAILER_SMTP_MAX_RATE=20, a limit of 2 open transactions for one
    # domain, and 300 accepted messages over three domains
    relay = PacedRelay(hold=0.05)
    with running_smtp_server(handler=relay) as (_, port, _):
        env = base_env(db_url, redis.url, port, MAILER_SMTP_MAX_RATE="20",
                       MAILER_DOMAIN_LIMITS="two.example=100/s:2,*=100/s:6",
                       MAILER_SEND_LEASE="60s")
        tag = _tag()
        addresses = [f"r{n}-{tag}@{('two', 'b', 'c')[n % 3]}.example" for n in range(300)]
        rt, ids = _accept(env, addresses)
        # When two worker processes (4 threads each) send them
        worker = WorkerProcess(env, processes=2, threads=4)
        try:
            wait_for(lambda: _statuses(rt, ids) == Counter({"sent": 300}), timeout=120,
                     interval=0.2)
        finally:
            worker.stop()
    times = sorted(t for t, _ in relay.arrivals)
    assert len(times) == 300
    # Then after the one-second burst the relay saw 20 messages a second (+-20 %)
    steady = times[20:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    # And no two-second window held more than two seconds' quota plus the burst
    busiest = max(sum(1 for u in times if t <= u < t + 2.0) for t in times)
    print(f"\npace: {rate:.1f} msg/s over {steady[-1] - steady[0]:.1f} s, busiest 2 s window "
          f"{busiest}, max open per domain {dict(relay.max_open)}")
    assert 16.0 <= rate <= 24.0
    assert busiest <= 2 * 20 * 1.2 + 20
    # And the limited domain never had more than 2 transactions open at once
    assert relay.max_open["two.example"] <= 2
    assert max(relay.max_open.values()) <= 6


def test_a_throttled_domain_waits_while_other_domains_flow(
    db_url: str, redis: RedisServer
) -> None:
    # Given a relay that answers 421 4.7.0 to slow.example for its first 3 seconds
    relay = PacedRelay(hold=0.0, throttle_domain="slow.example", throttle_seconds=3.0)
    with running_smtp_server(handler=relay) as (_, port, _):
        env = base_env(db_url, redis.url, port, MAILER_DOMAIN_LIMITS="*=50/s:4",
                       MAILER_SEND_LEASE="60s")
        tag = _tag()
        slow = [f"s{n}-{tag}@slow.example" for n in range(60)]
        fast = [f"f{n}-{tag}@fast.example" for n in range(60)]
        # Interleaved, so throttled and unthrottled mail share the same chunks
        rt, ids = _accept(env, [a for pair in zip(slow, fast, strict=True) for a in pair])
        # When a worker sends them
        worker = WorkerProcess(env, processes=1, threads=4)
        try:
            wait_for(lambda: _statuses(rt, ids) == Counter({"sent": 120}), timeout=120,
                     interval=0.2)
        finally:
            worker.stop()
    arrivals = sorted(relay.arrivals)
    fast_done = max(t for t, d in arrivals if d == "fast.example")
    slow_first = min(t for t, d in arrivals if d == "slow.example")
    print(f"\nthrottle: {relay.throttled} throttled replies; fast.example done "
          f"{fast_done - arrivals[0][0]:.1f} s, slow.example first after "
          f"{slow_first - arrivals[0][0]:.1f} s")
    # Then every fast.example message arrived before the first slow.example one
    assert fast_done < slow_first
    # And every slow.example message arrived eventually, none failed
    assert Counter(d for _, d in arrivals) == Counter({"slow.example": 60, "fast.example": 60})
    # And the relay had to say "try again later" only a few times, not once per message
    # (at most the transactions already open when the first 421 came: the domain's 4, twice)
    assert relay.throttled <= 8
