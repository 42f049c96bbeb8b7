"""A relay-wide throttling reply slows the global pace of every domain (SPEC 5, "Sending pace").

A throttling reply about our *account at the relay* (a 421 at the greeting, a throttling
reply at MAIL FROM before any recipient is named, or a text naming the sending account's
rate or quota such as Amazon SES's "454 Throttling failure: Maximum sending rate
exceeded.") halves the global pace with the domain rules; other throttling replies still
slow only the recipient's domain. Pure classification, :class:`MemoryPace` on a fake
clock, :class:`RedisPace` in a real redis-server shared by two pace instances, and the
paced transport against a real aiosmtpd relay.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from mailer.smtp import bucket
from mailer.smtp.limits import parse_domain_limits
from mailer.smtp.pace import MemoryPace, PaceLimits, Permit, is_relay_throttling, is_throttling
from mailer.smtp.pace_redis import RedisPace
from mailer.smtp.paced import PacedTransport
from mailer.smtp.pool import SmtpTransport
from mailer.smtp.replies import Outcome, Stage
from tests.services import RedisServer
from tests.smtp.test_pace import FakeClock, memory_pace
from tests.smtp_servers import Recorder, running_smtp_server
from tests.smtp_servers import sample_envelope as message

T = TypeVar("T")

#: Amazon SES's SMTP replies when the account's sending limits are reached.
SES_RATE = "Throttling failure: Maximum sending rate exceeded."
SES_DAILY = "Throttling failure: Daily message quota exceeded."


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


# -- which replies are about the relay ---------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "stage", "relay"),
    [
        # Amazon SES: account quota replies, after DATA or at MAIL FROM
        (454, SES_RATE, Stage.DATA, True),
        (454, SES_RATE, Stage.MAIL, True),
        (454, SES_DAILY, Stage.DATA, True),
        (454, SES_RATE, Stage.RCPT, True),
        # a busy relay at the greeting or EHLO: no recipient named yet
        (421, "4.7.0 Try again later, closing connection.", Stage.CONNECT, True),
        (421, "4.3.2 Service shutting down", Stage.CONNECT, True),
        (421, "Too many concurrent SMTP connections from this IP", Stage.CONNECT, True),
        # a throttling reply at MAIL FROM, before any recipient
        (451, "4.7.1 Please try again later", Stage.MAIL, True),
        (421, "4.7.0 Try again later, closing connection", Stage.MAIL, True),
        # other providers' account limits, at any stage
        (432, "4.3.2 Concurrent connections limit exceeded.", Stage.MAIL, True),
        (432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded.", Stage.DATA, True),
        (451, "You've exceeded your messaging limits", Stage.DATA, True),
        (452, "4.4.5 Messages per second limit exceeded", Stage.MAIL, True),
        (452, "4.5.3 Daily message limit exceeded", Stage.RCPT, True),
        (451, "4.7.0 Daily sending quota exceeded, try again later", Stage.DATA, True),
        # throttling replies about the recipient's domain stay per-domain
        (421, "4.7.0 Try again later, closing connection", Stage.RCPT, False),
        (450, "4.7.1 Temporarily deferred, try again in 5 minutes", Stage.RCPT, False),
        (421, "4.7.0 Our system has detected an unusual rate of unsolicited mail "
              "originating from your IP address", Stage.DATA, False),
        (451, "4.3.0 Too many messages from your IP, slow down", Stage.RCPT, False),
        (452, "4.3.2 Connection rate limit exceeded.", Stage.RCPT, False),
        # an unknown stage (a caller that does not say) keeps the per-domain rule
        (421, "4.7.0 Try again later", None, False),
        # not throttling at all, at whatever stage
        (454, "4.7.0 Temporary authentication failure", Stage.CONNECT, False),
        (530, "5.7.0 Authentication required", Stage.MAIL, False),
        (550, "5.4.5 Daily user sending quota exceeded.", Stage.MAIL, False),
        (552, "Message would take you over your relay quota of 500", Stage.DATA, False),
        (452, "4.2.2 Mailbox over quota", Stage.RCPT, False),
        (452, "4.5.3 Too many recipients", Stage.RCPT, False),
        (451, "4.3.0 Temporary local problem, try again later", Stage.MAIL, False),
        (None, "connection lost", Stage.CONNECT, False),
        (250, "2.0.0 OK", None, False),
    ],
)
def test_is_relay_throttling(code: int | None, text: str, stage: Stage | None,
                             relay: bool) -> None:
    assert is_relay_throttling(code, text, stage) is relay


@pytest.mark.parametrize(
    "text",
    ["4.3.2 Concurrent connections limit exceeded.", "You've exceeded your messaging limits",
     "4.5.3 Daily message limit exceeded", "4.4.5 Messages per second limit exceeded"],
)
def test_a_4xx_naming_an_account_limit_is_a_throttling_reply(text: str) -> None:
    # Given a temporary reply naming a sending limit without the word "rate" or "throttl"
    # Then it slows a pace down like any rate-limit text
    assert is_throttling(452, text) is True
    # And the same text as a permanent reply never does (RFC 5321 4.2.1: 5yz is final)
    assert is_throttling(552, text) is False


# -- MemoryPace on a fake clock ---------------------------------------------------------


def test_a_relay_wide_reply_slows_every_domain_and_recovers() -> None:
    # Given a global 20/s and 20/s for each domain
    clock = FakeClock()
    pace = memory_pace(clock, max_rate=20.0, domains=parse_domain_limits("*=20/s"))

    async def scenario() -> None:
        # When a.example's transaction gets SES's quota reply at MAIL FROM
        permit = await pace.acquire("a.example")
        assert await pace.release(permit, 454, SES_RATE, Stage.MAIL) is True
        # Then b.example, never throttled itself, waits with the relay: 10/s, 10 s to recover
        other = await pace.status("b.example")
        assert other.relay_slowed and other.relay_rate == pytest.approx(10.0)
        assert not other.slowed and other.rate == 20.0
        assert other.hold_reason.startswith("the relay is slowed")
        assert await pace.defer_hint("b.example") == pytest.approx(10.0)
        # And so does a.example, whose own domain pace is untouched
        own = await pace.status("a.example")
        assert not own.slowed and own.rate == 20.0
        assert await pace.defer_hint("a.example") == pytest.approx(10.0)
        # And the global burst is gone: a new transaction anywhere waits 1/10 s
        assert await pace.try_acquire("c.example") == pytest.approx(0.1)
        # And a second quota reply within the second is the same signal
        clock.now += 0.5
        late = Permit("b.example", 1, "in-flight")
        assert await pace.release(late, 454, SES_RATE, Stage.DATA) is False
        assert (await pace.status("b.example")).relay_rate == pytest.approx(10.5)
        # When the relay stays quiet for 10 s, every domain is back at full pace
        clock.now += 9.5
        back = await pace.status("b.example")
        assert not back.relay_slowed and back.relay_rate == 20.0
        assert await pace.defer_hint("b.example") == 0.0
        assert await pace.defer_hint("a.example") == 0.0

    run(scenario())


def test_a_relay_wide_reply_holds_the_global_rate_at_half() -> None:
    # Given a global 20/s, and a relay-wide reply that halves it to 10/s
    clock = FakeClock()
    pace = memory_pace(clock, max_rate=20.0)

    async def scenario() -> int:
        await pace.release(await pace.acquire("a.example"), 421, "4.7.0 Try again later",
                           Stage.CONNECT)
        # When two domains take turns sending for 2 simulated seconds
        start, granted = clock.now, 0
        for turn in range(100):
            domain = ("a.example", "b.example")[turn % 2]
            await pace.release(await pace.acquire(domain), 250, "2.0.0 OK", None)
            if clock.now - start > 2.0:
                break
            granted += 1
        return granted

    # Then together they got what the recovering global pace allows (10/s growing by
    # 1/s per second: 22 in 2 s), not the 20/s plus burst each would have had
    assert 21 <= run(scenario()) <= 23


def test_a_per_domain_reply_does_not_slow_the_relay() -> None:
    clock = FakeClock()
    pace = memory_pace(clock, max_rate=20.0, domains=parse_domain_limits("*=20/s"))

    async def scenario() -> None:
        # When a.example answers 421 at RCPT: the recipient domain's own limit
        permit = await pace.acquire("a.example")
        assert await pace.release(permit, 421, "4.7.0 Try again later", Stage.RCPT) is True
        # Then a.example is slowed and b.example, and the global pace, are not
        assert (await pace.status("a.example")).slowed
        assert (await pace.status("a.example")).hold_reason.startswith("the recipient domain")
        other = await pace.status("b.example")
        assert not other.relay_slowed and other.relay_rate == 20.0
        assert await pace.defer_hint("b.example") == 0.0
        assert isinstance(await pace.try_acquire("b.example"), Permit)

    run(scenario())


def test_a_relay_wide_reply_paces_an_unlimited_sender_from_the_nominal_rate() -> None:
    # Given no MAILER_SMTP_MAX_RATE at all
    clock = FakeClock()
    pace = memory_pace(clock)

    async def scenario() -> None:
        assert (await pace.status("a.example")).relay_rate is None
        # When the relay closes at the greeting with 421
        await pace.release(await pace.acquire("a.example"), 421, "4.3.2 Try again later",
                           Stage.CONNECT)
        # Then the global pace is half the nominal unlimited rate, for every domain
        status = await pace.status("b.example")
        assert status.relay_rate == pytest.approx(bucket.DEFAULT_UNLIMITED_DOMAIN_RATE / 2)
        assert status.relay_slowed and status.rate is None and not status.slowed
        assert await pace.defer_hint("b.example") == pytest.approx(10.0)
        # And once recovered it is unlimited again
        clock.now += 10.0
        assert (await pace.status("b.example")).relay_rate is None
        for _ in range(500):
            assert isinstance(await pace.try_acquire("b.example"), Permit)

    run(scenario())


def test_a_relay_that_keeps_throttling_halves_the_global_pace_once_a_second() -> None:
    clock = FakeClock()
    pace = memory_pace(clock, max_rate=16.0)

    async def scenario() -> list[float]:
        rates = []
        for _ in range(7):
            await pace.release(Permit("x.example", 1, "t"), 454, SES_DAILY, Stage.DATA)
            status = await pace.status("y.example")
            assert status.relay_rate is not None
            rates.append(status.relay_rate)
            clock.now += 1.0
        return rates

    rates = run(scenario())
    # Then each reply a second apart halved what it had recovered to (+5 % of 16/s)
    assert rates[0] == pytest.approx(8.0)
    assert rates[1] == pytest.approx((8.0 + 16.0 * 0.05) / 2)
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)
    # And it settles where a second's recovery (5 % of 16/s) meets the halving: 0.8/s
    assert rates[-1] == pytest.approx(16.0 * 0.05, abs=0.15)
    assert min(rates) >= 16.0 * bucket.MIN_RATE_FRACTION


# -- RedisPace: the same rules, shared by processes -------------------------------------


@pytest.fixture()
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing the server never meet."""
    return f"test-relay-{uuid.uuid4().hex[:8]}"


def run_pair(redis_server: RedisServer, prefix: str,
             scenario: Callable[[RedisPace, RedisPace], Awaitable[T]], **limits: Any) -> T:
    """Run ``scenario`` with two RedisPace instances (two "processes") on one Redis."""

    async def main() -> T:
        first = RedisPace.from_url(redis_server.url, PaceLimits(**limits), prefix=prefix)
        second = RedisPace.from_url(redis_server.url, PaceLimits(**limits), prefix=prefix)
        try:
            return await scenario(first, second)
        finally:
            await first.close()
            await second.close()

    return asyncio.run(main())


def test_redis_a_relay_wide_reply_in_one_process_slows_every_domain_in_another(
    redis_server: RedisServer, prefix: str
) -> None:
    # Given two processes sharing a global 20/s and 20/s per domain, recovering 25 %/s
    async def scenario(one: RedisPace, two: RedisPace) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        # When process one gets SES's quota reply for a.example at MAIL FROM
        permit = await one.acquire("a.example")
        seen["slowed"] = await one.release(permit, 454, SES_RATE, Stage.MAIL)
        # Then process two sees every domain held, the relay at 10/s
        seen["b"] = await two.status("b.example")
        seen["a"] = await two.status("a.example")
        seen["hint"] = await two.defer_hint("b.example")
        # And process two's in-flight quota reply within the second changes nothing
        seen["again"] = await two.release(Permit("b.example", 1, "x"), 454, SES_RATE,
                                          Stage.DATA)

        # And both processes sending to two domains for 0.8 s share the slowed pace
        async def count(pace: RedisPace, domain: str) -> int:
            granted, end = 0, time.monotonic() + 0.8
            while time.monotonic() < end:
                await pace.release(await pace.acquire(domain), 250, "2.0.0 OK", None)
                granted += 1
            return granted

        seen["counts"] = await asyncio.gather(count(one, "a.example"), count(two, "b.example"))
        # And 2.5 quiet seconds later the relay is back at 20/s
        await asyncio.sleep(2.5)
        seen["recovered"] = await two.status("b.example")
        seen["recovered_hint"] = await one.defer_hint("a.example")
        return seen

    seen = run_pair(redis_server, prefix, scenario, max_rate=20.0, recovery=0.25,
                    domains=parse_domain_limits("*=20/s"))
    assert seen["slowed"] is True and seen["again"] is False
    b, a = seen["b"], seen["a"]
    assert b.relay_slowed and 10.0 <= b.relay_rate < 11.0
    assert not b.slowed and b.rate == 20.0  # the domain's own pace is untouched
    assert a.relay_slowed and not a.slowed
    assert 1.8 <= seen["hint"] <= 2.0  # back to 20/s after (20 - 10) / (20 * 0.25) s
    # Together 10/s growing to 14/s over 0.8 s from an empty bucket, not 2 x (20 + burst)
    together = sum(seen["counts"])
    assert together <= 14, seen["counts"]
    assert seen["recovered"].relay_rate == 20.0 and not seen["recovered"].relay_slowed
    assert seen["recovered_hint"] == 0.0
    print(f"\nin 0.8 s after a relay-wide 454: {seen['counts']} across two processes")


def test_redis_a_per_domain_reply_leaves_the_relay_alone(redis_server: RedisServer,
                                                         prefix: str) -> None:
    async def scenario(one: RedisPace, two: RedisPace) -> tuple[Any, Any, float]:
        # When a.example answers 421 4.7.0 at RCPT in process one
        await one.release(await one.acquire("a.example"), 421, "4.7.0 Try again later",
                          Stage.RCPT)
        # Then process two sees a.example slowed, b.example and the relay not
        return (await two.status("a.example"), await two.status("b.example"),
                await two.defer_hint("b.example"))

    a, b, hint = run_pair(redis_server, prefix, scenario, max_rate=20.0,
                          domains=parse_domain_limits("*=20/s"))
    assert a.slowed and not a.relay_slowed
    assert not b.slowed and not b.relay_slowed and b.relay_rate == 20.0
    assert hint == 0.0


def test_redis_an_unlimited_relay_is_slowed_and_its_key_expires(redis_server: RedisServer,
                                                                prefix: str) -> None:
    # Given neither a global rate nor domain limits (the pace runs for other reasons)
    async def scenario(one: RedisPace, two: RedisPace) -> tuple[Any, Any]:
        before = await two.status("b.example")
        # When the relay closes at the greeting with 421
        await one.release(Permit("a.example", 1, "t"), 421, "4.3.2 Try again later",
                          Stage.CONNECT)
        return before, await two.status("b.example")

    before, after = run_pair(redis_server, prefix, scenario)
    assert before.relay_rate is None and not before.relay_slowed
    assert after.relay_slowed
    assert after.relay_rate == pytest.approx(bucket.DEFAULT_UNLIMITED_DOMAIN_RATE / 2, abs=0.1)
    assert 9.5 <= after.hold <= 10.0
    # And the relay's state is one key, which expires on its own
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k.decode() for k in client.scan_iter(f"{prefix}:*")]
        assert keys == [f"{prefix}:global"]
        assert client.pttl(keys[0]) > 0
    finally:
        client.close()


# -- PacedTransport against a real relay ------------------------------------------------


class QuotaRelay(Recorder):
    """Answers Amazon SES's rate-quota reply to every MAIL FROM while ``quota`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.quota = True
        self.refused = 0

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        """Refuse the sender while over quota, else take it as aiosmtpd would."""
        if self.quota:
            self.refused += 1
            return f"454 {SES_RATE}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"


def test_a_quota_reply_holds_every_domains_mail_without_asking_the_relay_again() -> None:
    # Given a relay over its account's sending rate, and a global pace of 20/s
    relay = QuotaRelay()
    with running_smtp_server(handler=relay) as (host, port, _):
        limits = PaceLimits(max_rate=20.0, domains=parse_domain_limits("*=20/s:2"))

        async def scenario() -> list[Any]:
            paced = PacedTransport(SmtpTransport(host, port, pool_size=4), MemoryPace(limits))
            try:
                first = await paced.send(message(0, to="a@one.example"))
                # When mail for that domain and two others follows
                rest = await paced.send_many(
                    [message(n, to=f"u{n}@{('one', 'two', 'three')[n % 3]}.example")
                     for n in range(1, 13)])
            finally:
                await paced.close()
            return [first, *rest]

        results = asyncio.run(scenario())
    first, rest = results[0], results[1:]
    # Then the refused message is deferred (never failed) with the group's wait
    assert first.outcome is Outcome.DEFERRED and first.code == 454 and first.stage is Stage.MAIL
    assert first.retry_after is not None and 9.0 <= first.retry_after <= 10.0
    # And every domain's mail is held back by the pace, the relay not asked again
    assert all(r.outcome is Outcome.DEFERRED and r.stage is Stage.PACE for r in rest)
    assert all(r.retry_after and r.retry_after > 9.0 for r in rest)
    assert all("relay is slowed" in r.response for r in rest)
    assert relay.refused == 1
    assert relay.messages == []

