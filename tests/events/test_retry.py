"""The backoff of a failing endpoint, and when a delivery is given up (SPEC 13)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from mailer.events.retry import GIVE_UP_AFTER, JITTER, MAX_DELAY, gives_up, retry_delay

BASE = timedelta(seconds=30)


def test_delays_double_from_the_base_within_the_jitter() -> None:
    rng = random.Random(7)
    for failures in range(1, 8):
        expected = BASE * 2 ** (failures - 1)
        for _ in range(50):
            delay = retry_delay(failures, BASE, rng=rng)
            assert expected * (1 - JITTER) <= delay <= expected * (1 + JITTER)


def test_delays_stop_growing_at_the_cap() -> None:
    rng = random.Random(7)
    for failures in (9, 20, 1000):
        assert retry_delay(failures, BASE, rng=rng) <= MAX_DELAY * (1 + JITTER)
        assert retry_delay(failures, BASE, rng=rng) >= MAX_DELAY * (1 - JITTER)


def test_jitter_spreads_endpoints_that_failed_together() -> None:
    rng = random.Random(1)
    delays = {retry_delay(3, BASE, rng=rng) for _ in range(20)}
    assert len(delays) > 10


def test_a_failing_endpoint_is_retried_for_at_least_24_hours_then_given_up() -> None:
    # Given a delivery that fails on every attempt, retried on the backoff schedule
    rng = random.Random(3)
    created = datetime(2026, 1, 1, tzinfo=UTC)
    now, attempts = created, []
    # When it is attempted until given up (bounded: the schedule must end)
    for failures in range(1, 200):
        attempts.append(now)
        if gives_up(created, now):
            break
        now += retry_delay(failures, BASE, rng=rng)
    # Then the last attempt is at least 24 hours after the event, and not long after
    assert gives_up(created, attempts[-1])
    assert attempts[-1] - created >= GIVE_UP_AFTER
    assert attempts[-1] - created < GIVE_UP_AFTER + MAX_DELAY * (1 + JITTER)
    # And every attempt before it was not given up
    assert not any(gives_up(created, t) for t in attempts[:-1])
    # And the probes thinned out: about a dozen in the first hour, not hundreds
    assert len([t for t in attempts if t - created < timedelta(hours=1)]) < 10
    assert 10 < len(attempts) < 40
