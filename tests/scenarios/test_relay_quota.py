"""A relay over its account's sending quota holds every domain's mail (SPEC 5, "Sending pace").

A real worker process, a private Redis and a real aiosmtpd relay that answers Amazon SES's
"454 Throttling failure: Maximum sending rate exceeded." at MAIL FROM for two seconds:
the reply is about our account, not the recipient's domain, so the global pace slows and
mail for a domain that never got such a reply waits with the rest instead of hammering
the relay; nothing is failed or suppressed, and everything arrives afterwards.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Any

from tests.conftest import WorkerProcess, auth, base_env, wait_for
from tests.scenarios.test_relay_pace import _statuses
from tests.services import RedisServer
from tests.smtp_servers import Recorder, running_smtp_server

#: How long the relay stays over quota after the first MAIL FROM it sees.
QUOTA_SECONDS = 2.0
#: By then the transactions under way at the first refusal have had their reply.
SETTLE = 0.6


class OverQuotaRelay(Recorder):
    """Refuses every MAIL FROM with SES's rate-quota reply for a while; records it all."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.started: float | None = None
        self.mails: list[float] = []  # every MAIL FROM, refused or taken
        self.refusals: list[float] = []
        self.arrivals: list[tuple[float, str]] = []
        self._guard = threading.Lock()

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        """Over quota for ``seconds`` after the first MAIL FROM; then take the sender."""
        now = time.monotonic()
        with self._guard:
            self.mails.append(now)
            self.started = self.started or now
            if now - self.started < self.seconds:
                self.refusals.append(now)
                return "454 Throttling failure: Maximum sending rate exceeded."
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Keep the message and note when it came, and for which domain."""
        status = await super().handle_DATA(server, session, envelope)
        with self._guard:
            self.arrivals.append((time.monotonic(), envelope.rcpt_tos[0].rpartition("@")[2]))
        return status


def _events(rt: Any, ids: list[str]) -> list[tuple[str, str, str | None]]:
    from sqlalchemy import select

    from mailer.store.schema import message_events

    with rt.engine.connect() as conn:
        return [(r.message_id, r.type, r.detail) for r in conn.execute(
            select(message_events.c.message_id, message_events.c.type,
                   message_events.c.detail).where(message_events.c.message_id.in_(ids)))]


def test_a_relay_quota_reply_holds_every_domain_and_everything_arrives_later(
    db_url: str, redis: RedisServer
) -> None:
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.keys import create_key
    from mailer.runtime import Runtime

    # Given a relay over its account's sending rate for 2 s, a global 20/s, and 20 accepted
    # messages for one.example
    relay = OverQuotaRelay(QUOTA_SECONDS)
    tag = uuid.uuid4().hex[:8]
    with running_smtp_server(handler=relay) as (_, port, _):
        env = base_env(db_url, redis.url, port, MAILER_SMTP_MAX_RATE="20",
                       MAILER_DOMAIN_LIMITS="*=50/s:4", MAILER_SEND_LEASE="60s")
        rt = Runtime.from_settings(Settings.from_environ(env))
        with rt.engine.begin() as conn:
            key = create_key(conn, "quota", ["messages:transactional"])

        def accept(client: Any, domain: str) -> list[str]:
            batch = [{"template": "registration_confirmation",
                      "to": f"r{n}-{tag}@{domain}",
                      "data": {"name": "Q", "confirm_url": "https://example.test/c"}}
                     for n in range(20)]
            response = client.post("/v1/messages/batch", json={"messages": batch},
                                   headers=auth(key))
            assert response.status_code == 202, response.text
            return [r["id"] for r in response.json()["results"]]

        with TestClient(create_app(rt)) as client:
            first = accept(client, "one.example")
            # When a worker sends them and the relay answers with its quota reply
            worker = WorkerProcess(env, processes=1, threads=4)
            try:
                wait_for(lambda: relay.refusals, timeout=30, interval=0.02)
                quota_from = relay.refusals[0]
                # And mail for two.example, a domain never refused, is accepted meanwhile,
                # once the transactions under way at the first refusal have ended
                time.sleep(max(0.0, quota_from + SETTLE - time.monotonic()))
                second = accept(client, "two.example")
                accepted_second = time.monotonic()
                wait_for(lambda: _statuses(rt, first + second) == Counter({"sent": 40}),
                         timeout=45, interval=0.2)
            finally:
                worker.stop()
    done = max(t for t, _ in relay.arrivals)
    first_arrival = {d: min(t for t, dd in relay.arrivals if dd == d)
                     for d in ("one.example", "two.example")}
    print(f"\nrelay quota: {len(relay.refusals)} refused MAIL FROM; two.example accepted "
          f"{accepted_second - quota_from:.2f} s after the first refusal; first arrivals "
          f"{ {d: round(t - quota_from, 1) for d, t in first_arrival.items()} } s; all 40 "
          f"in {done - quota_from:.1f} s")
    # Then the relay was asked again by neither domain while the global pace was slowed:
    # only transactions under way at the first refusal reached it, and two.example's mail,
    # waiting while the quota still lasted, never did (under a per-domain slowdown only
    # it would have been refused too)
    assert accepted_second - quota_from < QUOTA_SECONDS - 0.5
    assert all(t < quota_from + SETTLE for t in relay.refusals)
    assert [t - quota_from for t in relay.mails
            if quota_from + SETTLE <= t < quota_from + 9.0] == []
    assert len(relay.refusals) <= 8
    # And both domains' mail was held back by the pace as a group ("throttled"), including
    # two.example's, which the relay never refused
    held = {mid for mid, kind, detail in _events(rt, first + second)
            if kind == "deferred" and detail == "throttled"}
    assert set(second) <= held, f"{len(set(second) - held)} of two.example's 20 not held"
    assert held & set(first)
    # And nothing failed or was suppressed: every message arrived, after the hold
    assert Counter(d for _, d in relay.arrivals) == Counter({"one.example": 20,
                                                            "two.example": 20})
    assert all(t >= quota_from + QUOTA_SECONDS for t in first_arrival.values())
    # And within a bounded time: the 10 s recovery of the halved pace, plus sending
    assert done - quota_from < 30.0
