"""PacedTransport: the pool behind the sending pace, against a real aiosmtpd relay (SPEC 5)."""

from __future__ import annotations

import asyncio
from typing import Any

from mailer.smtp.limits import parse_domain_limits
from mailer.smtp.pace import MemoryPace, PaceLimits
from mailer.smtp.paced import PacedTransport
from mailer.smtp.pool import SmtpTransport
from mailer.smtp.replies import Outcome, Stage
from tests.smtp_servers import Recorder, running_smtp_server
from tests.smtp_servers import sample_envelope as message


class ThrottlingRelay(Recorder):
    """Answers ``421 4.7.0`` to every RCPT for one domain; counts those replies."""

    def __init__(self, domain: str) -> None:
        super().__init__()
        self.domain = domain
        self.throttled = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """Throttle the one domain, accept the others."""
        if address.endswith("@" + self.domain):
            self.throttled += 1
            return "421 4.7.0 Try again later, closing connection"
        return await super().handle_RCPT(server, session, envelope, address, options)


def test_a_throttled_domain_waits_as_a_group_while_others_flow() -> None:
    # Given a relay that throttles slow.example, and a pace of 10/s per domain
    relay = ThrottlingRelay("slow.example")
    with running_smtp_server(handler=relay) as (host, port, _):
        limits = PaceLimits(domains=parse_domain_limits("*=10/s:2"))

        async def scenario() -> list[Any]:
            paced = PacedTransport(SmtpTransport(host, port, pool_size=4), MemoryPace(limits))
            first = await paced.send(message(0, to="a@slow.example"))
            # When 20 more for slow.example and 10 for fast.example follow
            rest = await paced.send_many(
                [message(n, to=f"u{n}@slow.example") for n in range(1, 21)]
                + [message(n, to=f"u{n}@fast.example") for n in range(21, 31)])
            await paced.close()
            return [first, *rest]

        results = asyncio.run(scenario())
    first, slow, fast = results[0], results[1:21], results[21:]
    # Then the throttled message is deferred (not failed) with a group wait
    assert first.outcome is Outcome.DEFERRED and first.code == 421
    assert first.retry_after is not None and first.retry_after > 1
    # And the domain's other mail is held back without asking the relay again
    assert all(r.outcome is Outcome.DEFERRED and r.stage is Stage.PACE for r in slow)
    assert all(r.retry_after and r.retry_after > 1 for r in slow)
    assert relay.throttled == 1
    # And the other domain's mail all went out
    assert [r.outcome for r in fast] == [Outcome.SENT] * 10
    assert len(relay.messages) == 10
