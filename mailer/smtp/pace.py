"""Sending pace shared by every worker process and host: global and per-domain limits.

SPEC section 5 ("Sending pace"). Around each SMTP transaction a worker calls::

    permit = await pace.acquire(domain, n=len(recipients))   # waits for its turn
    try:
        result = await transport.send(envelope)
    except BaseException:
        await pace.release(permit)
        raise
    await pace.release(permit, result.code, result.response)  # a 421 slows the domain

:meth:`Pace.acquire` waits until the global bucket (``MAILER_SMTP_MAX_RATE``), the
domain's bucket and the domain's concurrency (``MAILER_DOMAIN_LIMITS``) all allow the
transaction, and takes from all three at once or from none. :meth:`Pace.release` frees
the slot, and a throttling reply (:func:`is_throttling`) halves the domain's pace
(:mod:`mailer.smtp.bucket` has the rules). :meth:`Pace.defer_hint` tells a worker how
long to put a slowed domain's queued mail aside as a group instead of making each
message wait or retry on its own.

:class:`~mailer.smtp.pace_redis.RedisPace` keeps the state in Redis so that all processes
on all hosts share it (one Lua script per step). :class:`MemoryPace` runs the same rules
in one process, on an injected clock: for a single process and for tests.
"""

from __future__ import annotations

import abc
import asyncio
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailer.smtp import bucket
from mailer.smtp.bucket import Bucket, Slowdown
from mailer.smtp.limits import (
    DomainLimit,
    limit_for,
    normalise_domain,
    parse_domain_limits,
    parse_max_rate,
)

#: How long a transaction may hold a domain's concurrency slot before the slot expires on
#: its own: a worker killed mid-transaction cannot keep it for longer. Above the SMTP
#: client's per-command timeout (30 s) times the commands of one transaction.
DEFAULT_LEASE = 180.0

#: How long :meth:`Pace.acquire` waits for its turn before giving up with PaceTimeout.
DEFAULT_ACQUIRE_TIMEOUT = 120.0

#: A waiter for a full domain looks again this often: a freed slot is not announced.
BUSY_POLL = 0.05

#: Key prefix in Redis; one pace per Redis database unless a caller picks another.
DEFAULT_PREFIX = "mailer:pace"

# RFC 3463 section 2: the enhanced status code that leads the reply text, "4.7.1".
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# Replies that ask us to come back later: counted only with a 4.7.x (policy) code or 421.
_TRY_LATER = re.compile(
    r"\btry(?:\s+again)?\s+later\b|\bretry\s+later\b|\btry\s+again\s+in\b"
    r"|\btemporar(?:il)?y\s+(?:deferred|rate|blocked|limited|throttled|suspended)",
    re.IGNORECASE,
)
# Replies that name a rate, volume or throttling limit: counted with any 4xx code.
_RATE_TEXT = re.compile(
    r"\brate[\s-]*limit|\bthrottl"
    r"|\btoo\s+many\s+(?:messages|mails?|e-?mails|connections|concurrent|sessions"
    r"|transactions|deliveries|requests)"
    r"|\b(?:sending|send|message|mail|connection|delivery)\s+rate\b"
    r"|\bslow\s+down\b|\bunusual\s+rate\b|\bunexpected\s+volume\b",
    re.IGNORECASE,
)


def is_throttling(code: int | None, text: str) -> bool:
    """Whether an SMTP reply asks us to slow down for the whole recipient domain.

    SPEC section 5: 421, or a 4xx that is 4.7.x "try again later" or names a rate limit.
    Replies about one mailbox (X.1.x addressing, X.2.x mailbox status, RFC 3463 section
    3.2-3.3, such as Gmail's 4.2.1 "receiving mail at a rate" for one busy user) and
    permanent 5xx replies never slow the domain down.
    """
    if code == 421:
        # RFC 5321 section 3.8: the server is closing the channel, usually for load.
        return True
    if code is None or not 400 <= code < 500:
        return False
    enhanced = _ENHANCED.match(text)
    subject = int(enhanced.group(2)) if enhanced else None
    if subject in (1, 2):
        return False
    if _RATE_TEXT.search(text):
        return True
    return subject == 7 and _TRY_LATER.search(text) is not None


class PaceTimeout(TimeoutError):
    """Raised by :meth:`Pace.acquire` when no permit could be had within its timeout."""


@dataclass(frozen=True)
class Permit:
    """The right to run one SMTP transaction of ``n`` messages to ``domain``; release it."""

    domain: str
    n: int
    #: Names this permit's concurrency slot; unguessable so one holder cannot free another's.
    token: str = field(repr=False)


@dataclass(frozen=True)
class DomainStatus:
    """A domain's pace right now, for :meth:`Pace.defer_hint`, metrics and tests."""

    #: Messages per second allowed now; None when neither configured nor slowed.
    rate: float | None
    #: Whether a throttling reply holds the domain below its configured rate.
    slowed: bool
    #: Seconds until it is back at its configured rate (0.0 when not slowed).
    recovers_in: float
    #: Seconds until its bucket has a token for one more message (0.0 when it has one now).
    next_in: float


@dataclass(frozen=True)
class PaceLimits:
    """The configured pace: the global rate, per-domain limits and the slot lease."""

    max_rate: float | None = None
    domains: Mapping[str, DomainLimit] = field(default_factory=dict)
    lease: float = DEFAULT_LEASE
    recovery: float = bucket.DEFAULT_RECOVERY_PER_SECOND

    def __post_init__(self) -> None:
        if self.max_rate is not None and not self.max_rate > 0:
            raise ValueError("max_rate must be above 0")
        if not self.lease > 0 or not self.recovery > 0:
            raise ValueError("lease and recovery must be above 0")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> PaceLimits:
        """Read ``MAILER_SMTP_MAX_RATE`` and ``MAILER_DOMAIN_LIMITS`` (PaceConfigError if bad)."""
        return cls(
            max_rate=parse_max_rate(environ.get("MAILER_SMTP_MAX_RATE")),
            domains=parse_domain_limits(environ.get("MAILER_DOMAIN_LIMITS")),
        )

    def for_domain(self, domain: str) -> DomainLimit | None:
        """The configured limit of ``domain`` (its own, else ``*``), or None."""
        return limit_for(self.domains, domain)

    def base_rate(self, domain: str) -> float:
        """The rate ``domain`` is halved from and recovers to (see bucket.throttle_base)."""
        limit = self.for_domain(domain)
        return bucket.throttle_base(limit.rate if limit else None, self.max_rate)


class Pace(abc.ABC):
    """Sending-pace control; one instance per event loop (the Redis one holds connections)."""

    def __init__(
        self,
        limits: PaceLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()

    @abc.abstractmethod
    async def try_acquire(self, domain: str, n: int = 1) -> Permit | float:
        """A permit if the transaction may start now, else the seconds to wait first."""

    @abc.abstractmethod
    async def release(self, permit: Permit, code: int | None = None, text: str = "") -> bool:
        """Free the permit's slot; report the reply. True when it slowed the domain down."""

    @abc.abstractmethod
    async def status(self, domain: str) -> DomainStatus:
        """The domain's pace right now."""

    async def acquire(
        self, domain: str, n: int = 1, *, timeout: float = DEFAULT_ACQUIRE_TIMEOUT
    ) -> Permit:
        """Wait until a transaction of ``n`` messages to ``domain`` may start; PaceTimeout."""
        deadline = self._clock() + timeout
        while True:
            got = await self.try_acquire(domain, n)
            if isinstance(got, Permit):
                return got
            remaining = deadline - self._clock()
            if remaining <= 0 or got > remaining:
                raise PaceTimeout(f"no sending slot within {timeout:g} s")
            # Waiters woken together would all race for the one new token: spread them.
            await self._sleep(max(got, 0.001) * self._rng.uniform(1.0, 1.25))

    async def defer_hint(self, domain: str) -> float:
        """Seconds to put a slowed domain's queued mail aside as a group; 0.0 if not slowed."""
        state = await self.status(domain)
        if not state.slowed:
            return 0.0
        return max(state.recovers_in, state.next_in)

    async def close(self) -> None:  # noqa: B027 (a hook: only some implementations hold I/O)
        """Release what the implementation holds open."""

    @staticmethod
    def _check(n: int) -> None:
        if n < 1:
            raise ValueError("a transaction carries at least one message")


@dataclass
class _DomainState:
    bucket: Bucket | None = None
    slowdown: Slowdown | None = None
    leases: dict[str, float] = field(default_factory=dict)


class MemoryPace(Pace):
    """The pace rules within one process, on an injectable clock (single process, tests).

    It keeps a small record per domain it has seen, for the life of the object.
    """

    def __init__(self, limits: PaceLimits, **kwargs: Any) -> None:
        super().__init__(limits, **kwargs)
        self._global: Bucket | None = None
        self._domains: dict[str, _DomainState] = {}

    def _state(self, domain: str, now: float) -> tuple[_DomainState, float | None]:
        """The domain's state with expired leases and a finished slowdown dropped, and rate."""
        state = self._domains.setdefault(domain, _DomainState())
        state.leases = {t: end for t, end in state.leases.items() if end > now}
        base = self.limits.base_rate(domain)
        if bucket.recovered(base, state.slowdown, now, self.limits.recovery):
            state.slowdown = None
        limit = self.limits.for_domain(domain)
        if state.slowdown is not None:
            return state, bucket.current_rate(base, state.slowdown, now, self.limits.recovery)
        return state, (limit.rate if limit else None)

    async def try_acquire(self, domain: str, n: int = 1) -> Permit | float:
        """A permit if the transaction may start now, else the seconds to wait first."""
        self._check(n)
        domain = normalise_domain(domain)
        now = self._clock()
        state, rate = self._state(domain, now)
        limit = self.limits.for_domain(domain)
        concurrency = limit.concurrency if limit is not None else None
        if concurrency is not None and len(state.leases) >= concurrency:
            return min(min(state.leases.values()) - now, BUSY_POLL)
        domain_after, domain_wait = None, 0.0
        if rate is not None:
            start = state.bucket or Bucket.full(rate, now)
            domain_after, domain_wait = bucket.take(start, n, rate, now)
        global_after, global_wait = None, 0.0
        if self.limits.max_rate is not None:
            start = self._global or Bucket.full(self.limits.max_rate, now)
            global_after, global_wait = bucket.take(start, n, self.limits.max_rate, now)
        wait = max(domain_wait, global_wait)
        if wait > 0:
            return wait
        # Everything allows it: take from all at once (never tokens from one and not another).
        if domain_after is not None:
            state.bucket = domain_after
        if global_after is not None:
            self._global = global_after
        permit = Permit(domain, n, uuid.uuid4().hex)
        state.leases[permit.token] = now + self.limits.lease
        return permit

    async def release(self, permit: Permit, code: int | None = None, text: str = "") -> bool:
        """Free the permit's slot; report the reply. True when it slowed the domain down."""
        now = self._clock()
        state, rate = self._state(permit.domain, now)
        state.leases.pop(permit.token, None)
        if not is_throttling(code, text):
            return False
        base = self.limits.base_rate(permit.domain)
        slowdown = bucket.slow_down(base, state.slowdown, now, self.limits.recovery)
        if slowdown is state.slowdown:
            return False  # halved less than a second ago: the same signal again
        # SPEC 5: new transactions to it wait. Keep any debt, drop any saved-up burst.
        tokens = 0.0
        if state.bucket is not None and rate is not None:
            tokens = min(bucket.refill(state.bucket, rate, now).tokens, 0.0)
        state.bucket = Bucket(tokens, now)
        state.slowdown = slowdown
        return True

    async def status(self, domain: str) -> DomainStatus:
        """The domain's pace right now."""
        domain = normalise_domain(domain)
        now = self._clock()
        state, rate = self._state(domain, now)
        if rate is None:
            return DomainStatus(None, False, 0.0, 0.0)
        base = self.limits.base_rate(domain)
        recovers_in = bucket.recovery_time(base, state.slowdown, now, self.limits.recovery)
        next_in = bucket.wait_for(state.bucket or Bucket.full(rate, now), 1, rate, now)
        return DomainStatus(rate, state.slowdown is not None, recovers_in, next_in)
