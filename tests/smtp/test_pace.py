"""The sending pace: its settings, throttling replies, the pure core, and Redis shared by processes.

Unit tests run the rules on a fake clock (:class:`MemoryPace`, :mod:`mailer.smtp.bucket`);
the integration tests run the Lua inside a real redis-server, with separate OS processes
competing for one limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailer.errors import ConfigError
from mailer.smtp import bucket
from mailer.smtp.bucket import Bucket, Slowdown
from mailer.smtp.limits import (
    DomainLimit,
    PaceConfigError,
    limit_for,
    parse_domain_limits,
    parse_max_rate,
    recipient_domain,
)
from mailer.smtp.pace import (
    BUSY_POLL,
    MemoryPace,
    PaceLimits,
    PaceTimeout,
    Permit,
    is_throttling,
)
from mailer.smtp.pace_redis import RedisPace
from tests.services import RedisServer

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


# -- MAILER_DOMAIN_LIMITS and MAILER_SMTP_MAX_RATE ----------------------------------------


def test_domain_limits_parse_rates_concurrency_and_the_default() -> None:
    # Given the documented example, with spacing, other units and a bare rate
    text = " gmail.com=20/s:5 , *=100/s:20,Example.ORG.=600/m,slow.example=36/h:1"
    # When it is parsed
    limits = parse_domain_limits(text)
    # Then every entry is there, domains normalised, rates per second
    assert limits == {
        "gmail.com": DomainLimit(20.0, 5),
        "*": DomainLimit(100.0, 20),
        "example.org": DomainLimit(10.0, None),
        "slow.example": DomainLimit(0.01, 1),
    }
    # And a domain without its own entry gets the * default, for itself
    assert limit_for(limits, "GMAIL.com") == DomainLimit(20.0, 5)
    assert limit_for(limits, "yahoo.com") == DomainLimit(100.0, 20)
    assert limit_for({"gmail.com": DomainLimit(1.0)}, "yahoo.com") is None


@pytest.mark.parametrize("text", [None, "", "   "])
def test_unset_domain_limits_mean_none(text: str | None) -> None:
    assert parse_domain_limits(text) == {}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("gmail.com=20:5", "'gmail.com=20:5'"),  # no unit
        ("gmail.com=20/s:5,yahoo.com", "'yahoo.com'"),  # no rate
        ("gmail.com=20/d:5", "'gmail.com=20/d:5'"),  # unknown unit
        ("gmail.com=fast/s", "'gmail.com=fast/s'"),
        ("gmail.com=0/s:5", "'gmail.com=0/s:5'"),  # zero rate
        ("gmail.com=20/s:0", "'gmail.com=20/s:0'"),  # zero concurrency
        ("gmail.com=20/s:-1", "'gmail.com=20/s:-1'"),
        ("gmail.com=20/s:5,,*=1/s", "empty entry"),
        ("gmail.com=20/s,", "empty entry"),
        ("gm ail.com=20/s", "'gm ail.com=20/s'"),
        ("bad_domain!.com=1/s", "'bad_domain!.com'"),
        ("bücher.de=1/s", "punycode"),
        ("a.com=1/s,A.com=2/s", "'a.com' twice"),
    ],
)
def test_bad_domain_limits_are_refused_naming_the_entry(text: str, named: str) -> None:
    # Given a malformed setting; when it is parsed; then the error names the bad part
    with pytest.raises(PaceConfigError) as error:
        parse_domain_limits(text)
    assert named in str(error.value)
    assert "MAILER_DOMAIN_LIMITS" in str(error.value)
    # And it is both a ValueError and the package's ConfigError (start-up refuses it)
    assert isinstance(error.value, ValueError) and isinstance(error.value, ConfigError)


@pytest.mark.parametrize(
    ("text", "rate"), [(None, None), ("", None), ("14", 14.0), ("14/s", 14.0), (" 0.5 ", 0.5)]
)
def test_max_rate_parses_messages_per_second(text: str | None, rate: float | None) -> None:
    assert parse_max_rate(text) == rate


@pytest.mark.parametrize("text", ["0", "-3", "fast", "inf", "nan", "10/m"])
def test_bad_max_rate_is_refused(text: str) -> None:
    with pytest.raises(PaceConfigError, match="MAILER_SMTP_MAX_RATE"):
        parse_max_rate(text)


def test_pace_limits_read_both_variables() -> None:
    limits = PaceLimits.from_environ(
        {"MAILER_SMTP_MAX_RATE": "14", "MAILER_DOMAIN_LIMITS": "gmail.com=20/s:5"}
    )
    assert limits.max_rate == 14.0
    assert limits.for_domain("gmail.com") == DomainLimit(20.0, 5)
    # A domain without a rate is halved from min(global, the unlimited default)
    assert limits.base_rate("other.example") == 14.0
    assert PaceLimits().base_rate("x.example") == bucket.DEFAULT_UNLIMITED_DOMAIN_RATE


def test_recipient_domain_is_the_normalised_part_after_the_last_at() -> None:
    assert recipient_domain('"a@b"@Mail.Example.COM.') == "mail.example.com"
    with pytest.raises(ValueError):
        recipient_domain("no-domain")


# -- throttling replies ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "throttling"),
    [
        # 421 always: the server is closing the channel (RFC 5321 section 3.8)
        (421, "4.7.0 Try again later, closing connection.", True),
        (421, "4.3.2 Service shutting down", True),
        (421, "Too many concurrent SMTP connections from this IP", True),
        # 4.7.x asking us to come back later, or naming a rate
        (451, "4.7.1 Please try again later", True),
        (450, "4.7.1 Temporarily deferred, try again in 5 minutes", True),
        (451, "4.7.650 The mail server has been temporarily rate limited due to IP reputation",
         True),
        (452, "4.7.0 Rate limit exceeded", True),
        # a rate-limit text with any 4xx code
        (454, "Throttling failure: Maximum sending rate exceeded.", True),
        (451, "4.3.0 Too many messages from your IP, slow down", True),
        (450, "Message rate limit reached", True),
        # 4.7.x that is not about pace: policy, TLS, authentication, reverse DNS
        (450, "4.7.1 Client host rejected: cannot find your reverse hostname", False),
        (454, "4.7.0 TLS not available due to local problem", False),
        (454, "4.7.0 Temporary authentication failure", False),
        # one mailbox's problem, even when it mentions a rate
        (450, "4.2.1 The user you are trying to contact is receiving mail at a rate that "
              "prevents additional messages from being delivered", False),
        (452, "4.2.2 Mailbox full, try again later", False),
        (450, "4.1.1 Recipient address rejected: try again later", False),
        (452, "4.5.3 Too many recipients", False),
        # ordinary temporary failures without a pace hint
        (451, "4.3.0 Temporary local problem, try again later", False),
        (450, "Requested mail action not taken: mailbox unavailable", False),
        # permanent replies and no reply never slow a domain down
        (550, "5.7.1 Rate limit exceeded, message refused", False),
        (554, "5.7.1 Service unavailable; try again later", False),
        (None, "connection lost", False),
        (250, "2.0.0 OK", False),
    ],
)
def test_is_throttling(code: int | None, text: str, throttling: bool) -> None:
    assert is_throttling(code, text) is throttling


# -- the pure core: token buckets ------------------------------------------------------


def test_a_new_bucket_bursts_one_seconds_quota_then_paces() -> None:
    # Given a full bucket at 20/s
    state, now = Bucket.full(20.0, 0.0), 0.0
    granted = 0
    # When we take one token at a time for as long as none needs waiting
    while True:
        state, wait = bucket.take(state, 1, 20.0, now)
        if wait:
            break
        granted += 1
    # Then exactly one second's quota went at once, and the next needs 1/20 s
    assert granted == 20
    assert wait == pytest.approx(0.05)
    assert bucket.take(state, 1, 20.0, now + 0.05)[1] == 0.0


def test_a_refused_take_takes_nothing_and_an_idle_bucket_holds_at_most_its_burst() -> None:
    state = Bucket(0.5, 0.0)
    after, wait = bucket.take(state, 1, 2.0, 0.0)
    assert wait == pytest.approx(0.25) and after.tokens == pytest.approx(0.5)
    assert bucket.refill(Bucket(0.0, 0.0), 2.0, 3600.0).tokens == pytest.approx(2.0)


def test_a_request_above_the_burst_goes_when_full_and_leaves_a_debt() -> None:
    # Given 0.5 msg/s (a burst of half a message) and a 3-message transaction
    after, wait = bucket.take(Bucket.full(0.5, 0.0), 3, 0.5, 0.0)
    # Then it goes, and the debt holds the average: the next message waits 7 s
    assert wait == 0.0 and after.tokens == pytest.approx(-2.5)
    assert bucket.wait_for(after, 1, 0.5, 0.0) == pytest.approx(6.0)


def test_a_clock_that_steps_back_does_not_drain_or_refill() -> None:
    state = Bucket(3.0, 100.0)
    assert bucket.refill(state, 10.0, 90.0) == Bucket(3.0, 100.0)


# -- the pure core: AIMD ---------------------------------------------------------------


def test_throttling_halves_once_a_second_and_recovers_linearly() -> None:
    base = 20.0
    # When a throttling reply comes at t=100
    first = bucket.slow_down(base, None, 100.0)
    # Then the pace halves
    assert first == Slowdown(10.0, 100.0)
    # And another reply within the second is the same signal: no second halving
    assert bucket.slow_down(base, first, 100.9) is first
    # And without new replies it grows back by 5 % of the base per second, capped
    assert bucket.current_rate(base, first, 101.0) == pytest.approx(11.0)
    assert bucket.recovery_time(base, first, 100.0) == pytest.approx(10.0)
    assert bucket.current_rate(base, first, 130.0) == base
    assert bucket.recovered(base, first, 110.0) and not bucket.recovered(base, first, 109.0)
    # And a reply two seconds later halves the pace it had by then (12/s)
    assert bucket.slow_down(base, first, 102.0) == Slowdown(6.0, 102.0)


def test_repeated_throttling_never_drops_below_the_floor() -> None:
    slowdown: Slowdown | None = None
    for second in range(20):
        slowdown = bucket.slow_down(32.0, slowdown, float(second), recovery=1e-9)
    assert slowdown is not None
    assert slowdown.rate == pytest.approx(32.0 * bucket.MIN_RATE_FRACTION)


def test_throttle_base_for_domains_without_a_rate() -> None:
    assert bucket.throttle_base(20.0, 5.0) == 20.0
    assert bucket.throttle_base(None, 14.0) == 14.0
    assert bucket.throttle_base(None, 1000.0) == bucket.DEFAULT_UNLIMITED_DOMAIN_RATE
    assert bucket.throttle_base(None, None) == bucket.DEFAULT_UNLIMITED_DOMAIN_RATE


# -- MemoryPace on a fake clock ----------------------------------------------------------


class FakeClock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class NoJitter(random.Random):
    """Waits exactly as long as asked, so simulated throughput is exact."""

    def uniform(self, a: float, b: float) -> float:
        return a


def memory_pace(clock: FakeClock, **limits: Any) -> MemoryPace:
    return MemoryPace(PaceLimits(**limits), clock=clock, sleep=clock.sleep, rng=NoJitter())


def test_memory_pace_holds_the_global_rate_over_simulated_minutes() -> None:
    # Given a global 10/s and a domain limit of 4/s for one domain
    clock = FakeClock()
    pace = memory_pace(clock, max_rate=10.0,
                       domains=parse_domain_limits("slow.example=4/s"))

    async def count(domain: str, seconds: float) -> int:
        start, granted = clock.now, 0
        while clock.now - start < seconds:
            permit = await pace.acquire(domain)
            await pace.release(permit)
            granted += 1
        return granted

    # When one caller sends for 60 simulated seconds to each
    fast = run(count("fast.example", 60.0))
    slow = run(count("slow.example", 60.0))
    # Then each got its rate plus one burst
    assert 600 + 10 - 1 <= fast <= 600 + 10 + 1
    assert 240 + 4 - 1 <= slow <= 240 + 4 + 1


def test_memory_pace_caps_concurrency_and_frees_slots_on_release_or_lease_expiry() -> None:
    clock = FakeClock()
    pace = memory_pace(clock, domains=parse_domain_limits("one.example=100/s:2"), lease=30.0)

    async def scenario() -> None:
        # Given two transactions in flight to a domain allowing two
        first = await pace.try_acquire("one.example")
        second = await pace.try_acquire("ONE.example.")
        assert isinstance(first, Permit) and isinstance(second, Permit)
        # Then a third must wait (a poll interval), while another domain is not held up
        assert await pace.try_acquire("one.example") == BUSY_POLL
        assert isinstance(await pace.try_acquire("two.example"), Permit)
        # When one is released, a third may go
        await pace.release(first)
        third = await pace.try_acquire("one.example")
        assert isinstance(third, Permit)
        # And when holders die without releasing, their slots free when the lease ends
        clock.now += 30.0
        assert isinstance(await pace.try_acquire("one.example"), Permit)
        assert isinstance(await pace.try_acquire("one.example"), Permit)
        # And a caller that cannot get a slot in time gives up
        with pytest.raises(PaceTimeout):
            await pace.acquire("one.example", timeout=1.0)

    run(scenario())


def test_memory_pace_slows_only_the_throttled_domain_and_recovers() -> None:
    clock = FakeClock()
    pace = memory_pace(clock, domains=parse_domain_limits("a.example=20/s,b.example=20/s"))

    async def scenario() -> None:
        # Given a transaction to each domain
        a = await pace.acquire("a.example")
        b = await pace.acquire("b.example")
        # When a.example answers 421 and b.example 250
        assert await pace.release(a, 421, "4.7.0 Try again later") is True
        assert await pace.release(b, 250, "2.0.0 OK") is False
        # Then a.example runs at half pace, with no burst left: the next waits 1/10 s
        status = await pace.status("a.example")
        assert status.slowed and status.rate == pytest.approx(10.0)
        assert status.next_in == pytest.approx(0.1)
        assert await pace.defer_hint("a.example") == pytest.approx(10.0)
        # And b.example is untouched
        assert (await pace.status("b.example")).rate == 20.0
        assert await pace.defer_hint("b.example") == 0.0
        # And a second 421 within the second changes nothing
        again = await pace.acquire("a.example")
        assert await pace.release(again, 421, "") is False
        # When 10 quiet seconds pass, a.example is back to its configured pace
        clock.now += 10.0
        status = await pace.status("a.example")
        assert status.rate == 20.0 and not status.slowed
        assert await pace.defer_hint("a.example") == 0.0

    run(scenario())


def test_memory_pace_slows_an_unlimited_domain_from_the_nominal_rate() -> None:
    clock = FakeClock()
    pace = memory_pace(clock)

    async def scenario() -> None:
        assert (await pace.status("free.example")).rate is None
        permit = await pace.acquire("free.example")
        await pace.release(permit, 421, "")
        assert (await pace.status("free.example")).rate == pytest.approx(25.0)
        clock.now += 60.0
        assert (await pace.status("free.example")).rate is None

    run(scenario())


def test_acquire_checks_the_transaction_size() -> None:
    with pytest.raises(ValueError):
        run(memory_pace(FakeClock()).try_acquire("a.example", 0))


# -- RedisPace against a real Redis --------------------------------------------------------


@pytest.fixture()
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing the server never meet."""
    return f"test-pace-{uuid.uuid4().hex[:8]}"


def redis_pace(redis_server: RedisServer, prefix: str, **limits: Any) -> RedisPace:
    return RedisPace.from_url(redis_server.url, PaceLimits(**limits), prefix=prefix)


def run_with(pace: RedisPace, scenario: Callable[[RedisPace], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await scenario(pace)
        finally:
            await pace.close()

    return asyncio.run(main())


def run_clients(redis_server: RedisServer, prefix: str, *, processes: int, domain: str,
                domain_limits: str = "", max_rate: str = "", count: int, tasks: int,
                hold: float = 0.0) -> list[list[tuple[float, float]]]:
    """Run pace clients as separate OS processes starting together; their events each."""
    start = time.time() + 2.0  # after every interpreter has imported and connected
    args = [redis_server.url, prefix, domain, domain_limits, max_rate, str(count), str(tasks),
            str(hold), repr(start)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.smtp.pace_client", *args], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(processes)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        assert proc.returncode == 0, err.decode(errors="replace")
        results.append([tuple(event) for event in json.loads(out)])
    return results


def test_two_processes_together_keep_the_global_rate(redis_server: RedisServer,
                                                     prefix: str) -> None:
    # Given two worker processes sharing MAILER_SMTP_MAX_RATE=20 through one Redis
    # When each acquires 120 permits as fast as it is let, with four tasks each
    per_process = run_clients(redis_server, prefix, processes=2, domain="any.example",
                              max_rate="20", count=120, tasks=4)
    # Then all 240 went, and both processes sent throughout the same period
    assert [len(events) for events in per_process] == [120, 120]
    spans = [(min(e[0] for e in events), max(e[0] for e in events)) for events in per_process]
    overlap = min(s[1] for s in spans) - max(s[0] for s in spans)
    assert overlap > 0.8 * (max(s[1] for s in spans) - min(s[0] for s in spans))
    # And after the first second's burst the aggregate is 20/s within 20 %
    times = sorted(e[0] for events in per_process for e in events)
    burst = 20
    rate = (len(times) - burst) / (times[-1] - times[0])
    assert 16.0 <= rate <= 24.0, rate
    # And no two-second window after the burst holds more than 2 x (20 + 20 %): two
    # seconds, not one, so that a process paused by the OS between its grant and its
    # clock reading cannot bunch the timestamps of one second into a shorter span
    steady = [t for t in times if t >= times[0] + 1.0]
    busiest = max(sum(1 for u in steady[i:] if u < t + 2.0) for i, t in enumerate(steady))
    assert busiest <= 48, busiest
    print(f"\naggregate rate {rate:.2f}/s over {times[-1] - times[0]:.2f} s, "
          f"busiest steady 2 s window {busiest}")


def max_overlap(events: list[tuple[float, float]]) -> int:
    """The most intervals ``[granted, released)`` open at one time."""
    edges = sorted([(t0, 1) for t0, _ in events] + [(t1, -1) for _, t1 in events],
                   key=lambda edge: (edge[0], edge[1]))  # a release before a grant at a tie
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def test_concurrency_per_domain_is_never_exceeded_across_processes(
    redis_server: RedisServer, prefix: str
) -> None:
    # Given a domain allowing 5 transactions at once, and 2 processes x 12 tasks wanting it
    per_process = run_clients(redis_server, prefix, processes=2, domain="busy.example",
                              domain_limits="busy.example=1000/s:5", count=96, tasks=12,
                              hold=0.03)
    # When each task holds its permit for up to 30 ms
    events = [e for process in per_process for e in process]
    # Then all 192 ran, never more than 5 at once (measured inside the held span), and
    # the limit was reached, so the test did press against it
    assert len(events) == 192
    peak = max_overlap(events)
    assert peak == 5, peak
    print(f"\nconcurrency peak {peak} of 5 over {len(events)} transactions")


def test_a_throttled_domain_halves_and_recovers_while_another_keeps_its_pace(
    redis_server: RedisServer, prefix: str
) -> None:
    # Given two domains at 20/s, recovering fast (25 % of the rate per second) for the test
    pace = redis_pace(redis_server, prefix, recovery=0.25,
                      domains=parse_domain_limits("slow.example=20/s,fast.example=20/s"))

    async def scenario(pace: RedisPace) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        permit = await pace.acquire("slow.example")
        # When slow.example answers 421
        seen["slowed"] = await pace.release(permit, 421, "4.7.0 Try again later")
        seen["after"] = await pace.status("slow.example")
        seen["other"] = await pace.status("fast.example")
        seen["hint"] = await pace.defer_hint("slow.example")
        seen["other_hint"] = await pace.defer_hint("fast.example")
        # And again within the second
        permit = await pace.acquire("slow.example")
        seen["again"] = await pace.release(permit, 421, "4.7.0 Try again later")

        # And both domains are sent to for 0.8 s
        async def count(domain: str) -> int:
            granted, end = 0, time.monotonic() + 0.8
            while time.monotonic() < end:
                permit = await pace.acquire(domain)
                await pace.release(permit, 250, "2.0.0 OK")
                granted += 1
            return granted

        seen["counts"] = await asyncio.gather(count("slow.example"), count("fast.example"))
        # And the throttling then stops for 2.5 s
        await asyncio.sleep(2.5)
        seen["recovered"] = await pace.status("slow.example")
        return seen

    seen = run_with(pace, scenario)
    # Then the pace of slow.example halved once, with no saved-up burst
    assert seen["slowed"] is True and seen["again"] is False
    assert seen["after"].slowed and 10.0 <= seen["after"].rate < 11.0
    assert 0.0 < seen["after"].next_in <= 0.1
    assert 1.8 <= seen["hint"] <= 2.0  # back to 20/s after (20 - 10) / (20 * 0.25) s
    # And fast.example kept its pace and its burst
    assert seen["other"].rate == 20.0 and not seen["other"].slowed
    assert seen["other_hint"] == 0.0
    slow, fast = seen["counts"]
    assert slow <= 14, slow  # 10/s growing to 14/s over 0.8 s, from an empty bucket
    assert fast >= 30, fast  # its full burst of 20 plus 20/s
    # And 2.5 quiet seconds later slow.example is back at 20/s
    assert seen["recovered"].rate == 20.0 and not seen["recovered"].slowed
    print(f"\nin 0.8 s after a 421: throttled domain {slow}, other domain {fast}")


def test_a_second_throttle_after_a_second_halves_the_recovered_pace(
    redis_server: RedisServer, prefix: str
) -> None:
    pace = redis_pace(redis_server, prefix, domains=parse_domain_limits("x.example=20/s"))

    async def scenario(pace: RedisPace) -> tuple[float, float]:
        # Given a domain halved to 10/s by a 421
        await pace.release(await pace.acquire("x.example"), 421, "")
        halved_at = time.monotonic()
        # When another 421 comes more than a second later
        await asyncio.sleep(1.1)
        elapsed = time.monotonic() - halved_at
        await pace.release(Permit("x.example", 1, "gone"), 421, "")
        second = await pace.status("x.example")
        assert second.rate is not None
        # (by then it had recovered by 5 % of 20/s per second)
        return 10.0 + 20.0 * 0.05 * elapsed, second.rate

    # Then the pace it had recovered to is halved again
    before, rate = run_with(pace, scenario)
    assert rate == pytest.approx(before / 2, abs=0.05)


def test_a_dead_holders_slot_frees_when_its_lease_ends(redis_server: RedisServer,
                                                       prefix: str) -> None:
    # Given a domain with one slot and a short lease
    pace = redis_pace(redis_server, prefix, lease=1.0,
                      domains=parse_domain_limits("one.example=100/s:1"))

    async def scenario(pace: RedisPace) -> None:
        # When a worker takes the slot and dies without releasing it
        dead = await pace.acquire("one.example")
        # Then others wait (and give up when their timeout is shorter than the lease)
        assert isinstance(await pace.try_acquire("one.example"), float)
        with pytest.raises(PaceTimeout):
            await pace.acquire("one.example", timeout=0.1)
        # And once the lease ends the slot is free again
        alive = await pace.acquire("one.example", timeout=5.0)
        # And the dead worker's late release does not free the new holder's slot
        await pace.release(dead)
        assert isinstance(await pace.try_acquire("one.example"), float)
        await pace.release(alive)
        assert isinstance(await pace.try_acquire("one.example"), Permit)

    run_with(pace, scenario)


def test_a_refused_acquire_takes_no_global_tokens(redis_server: RedisServer,
                                                  prefix: str) -> None:
    # Given a global 5/s and a domain whose only slot is taken
    pace = redis_pace(redis_server, prefix, max_rate=5.0,
                      domains=parse_domain_limits("full.example=100/s:1"))

    async def scenario(pace: RedisPace) -> list[Permit | float]:
        await pace.acquire("full.example")  # takes one global token of 5
        # When ten attempts for the full domain are refused
        for _ in range(10):
            assert isinstance(await pace.try_acquire("full.example"), float)
        # Then the other four tokens of the burst are still there for another domain
        return [await pace.try_acquire("free.example") for _ in range(5)]

    results = run_with(pace, scenario)
    assert [isinstance(r, Permit) for r in results] == [True] * 4 + [False]


@pytest.fixture()
def _no_leftover_keys(redis_server: RedisServer, prefix: str) -> Iterator[None]:
    yield
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        for key in client.scan_iter(f"{prefix}:*"):
            assert client.pttl(key) > 0, key  # every key expires on its own
    finally:
        client.close()


@pytest.mark.usefixtures("_no_leftover_keys")
def test_every_pace_key_in_redis_expires(redis_server: RedisServer, prefix: str) -> None:
    pace = redis_pace(redis_server, prefix, max_rate=50.0,
                      domains=parse_domain_limits("k.example=10/s:2"))

    async def scenario(pace: RedisPace) -> None:
        permit = await pace.acquire("k.example")
        await pace.release(permit, 421, "")
        await pace.acquire("k.example")  # never released: the lease key must still expire

    run_with(pace, scenario)
