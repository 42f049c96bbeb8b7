"""The arithmetic of the sending pace: token buckets and AIMD slow-down, pure and clock-free.

Every function takes ``now`` (seconds on any monotonic-enough clock) and returns new
values; nothing here reads a clock, sleeps or does I/O. :mod:`mailer.smtp.pace` runs the
same rules in-process (:class:`~mailer.smtp.pace.MemoryPace`) and, as Lua, inside Redis
(:class:`~mailer.smtp.pace.RedisPace`), so these functions are the reference the Lua
mirrors line by line.

Why these rules (SPEC section 5, "Sending pace"):

- A token bucket refilled at ``rate`` holding at most ``rate * BURST_SECONDS`` tokens, so
  a quiet sender may burst by at most one second's quota (a relay quota such as Amazon
  SES's counts messages per second). A request larger than the burst is let through when
  the bucket is full and leaves a debt (negative tokens), so the average still holds.
- Additive increase, multiplicative decrease (as in TCP's congestion control, RFC 5681):
  a throttling reply halves the domain's pace, at most once per :data:`SLOWDOWN_INTERVAL`
  so that a burst of replies from transactions already in flight counts as one signal;
  the pace then grows back linearly, by :data:`DEFAULT_RECOVERY_PER_SECOND` of the
  configured rate per second, until it is the configured rate again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: A bucket holds at most this many seconds of its rate (SPEC 5: at most one second's quota).
BURST_SECONDS = 1.0

#: A throttled domain's pace halves at most once per this many seconds (SPEC 5).
SLOWDOWN_INTERVAL = 1.0

#: Per second without a new throttling reply, a slowed domain regains this fraction of its
#: configured rate: from the floor back to full pace in about 20 s.
DEFAULT_RECOVERY_PER_SECOND = 0.05

#: However often it throttles, a domain keeps at least this fraction of its configured rate
#: (five halvings), so its queue still drains and we learn when the throttling ends.
MIN_RATE_FRACTION = 1 / 32

#: The pace a domain without a configured rate is taken to have had when it first answers
#: with a throttling reply (or the global rate, when that is lower): halving "unlimited"
#: would never slow anything.
DEFAULT_UNLIMITED_DOMAIN_RATE = 50.0

# Float noise must not turn "exactly enough tokens" into a wait of 1e-16 s.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Bucket:
    """A token bucket's state: ``tokens`` (negative for a debt) as of time ``at``."""

    tokens: float
    at: float

    @classmethod
    def full(cls, rate: float, now: float) -> Bucket:
        """A bucket holding its whole burst, as an unseen key starts."""
        return cls(capacity(rate), now)


def capacity(rate: float) -> float:
    """The most tokens a bucket refilled at ``rate`` holds: one second's quota."""
    return rate * BURST_SECONDS


def refill(bucket: Bucket, rate: float, now: float) -> Bucket:
    """The bucket at ``now`` after refilling at ``rate`` up to its capacity."""
    # A clock that steps back (another host's, or NTP) must not drain the bucket.
    elapsed = max(0.0, now - bucket.at)
    return Bucket(min(capacity(rate), bucket.tokens + elapsed * rate), max(now, bucket.at))


def take(bucket: Bucket, n: float, rate: float, now: float) -> tuple[Bucket, float]:
    """Try to take ``n`` tokens at ``now``: ``(bucket after, 0.0)``, else ``(bucket, wait)``.

    On refusal nothing is taken and ``wait`` is how long until there are enough tokens.
    """
    current = refill(bucket, rate, now)
    # More than the burst can never be in the bucket: go when it is full, leaving a debt.
    needed = min(n, capacity(rate))
    if current.tokens + _EPSILON >= needed:
        return Bucket(current.tokens - n, current.at), 0.0
    return current, (needed - current.tokens) / rate


def wait_for(bucket: Bucket, n: float, rate: float, now: float) -> float:
    """Seconds until ``n`` tokens could be taken (0.0 if now), without taking them."""
    return take(bucket, n, rate, now)[1]


@dataclass(frozen=True)
class Slowdown:
    """A domain slowed by throttling: its pace was ``rate`` right after the reply at ``since``."""

    rate: float
    since: float


def current_rate(
    base: float,
    slowdown: Slowdown | None,
    now: float,
    recovery: float = DEFAULT_RECOVERY_PER_SECOND,
) -> float:
    """The pace at ``now`` of a domain whose configured rate is ``base``."""
    if slowdown is None:
        return base
    elapsed = max(0.0, now - slowdown.since)
    return min(base, slowdown.rate + base * recovery * elapsed)


def recovered(
    base: float,
    slowdown: Slowdown | None,
    now: float,
    recovery: float = DEFAULT_RECOVERY_PER_SECOND,
) -> bool:
    """Whether the domain is back at its configured rate (or was never slowed)."""
    return current_rate(base, slowdown, now, recovery) >= base


def slow_down(base: float, slowdown: Slowdown | None, now: float,
              recovery: float = DEFAULT_RECOVERY_PER_SECOND) -> Slowdown | None:
    """The slowdown after a throttling reply at ``now``; the same one within a second of it."""
    if slowdown is not None and now - slowdown.since < SLOWDOWN_INTERVAL:
        return slowdown
    pace = current_rate(base, slowdown, now, recovery)
    return Slowdown(max(pace / 2, base * MIN_RATE_FRACTION), now)


def recovery_time(
    base: float,
    slowdown: Slowdown | None,
    now: float,
    recovery: float = DEFAULT_RECOVERY_PER_SECOND,
) -> float:
    """Seconds from ``now`` until the domain is back at its configured rate."""
    missing = base - current_rate(base, slowdown, now, recovery)
    return max(0.0, missing / (base * recovery))


def throttle_base(domain_rate: float | None, global_rate: float | None) -> float:
    """The rate a throttled domain's pace is halved from and recovers to.

    Its configured rate when it has one; otherwise :data:`DEFAULT_UNLIMITED_DOMAIN_RATE`,
    or the global rate when that is lower (halving a pace the global cap already holds
    below would change nothing).
    """
    if domain_rate is not None:
        return domain_rate
    if global_rate is not None:
        return min(global_rate, DEFAULT_UNLIMITED_DOMAIN_RATE)
    return DEFAULT_UNLIMITED_DOMAIN_RATE


def ttl_seconds(recovery: float = DEFAULT_RECOVERY_PER_SECOND) -> int:
    """How long an untouched pace record must be kept: past any refill and any recovery."""
    return math.ceil(BURST_SECONDS + 1 / recovery) + 60
