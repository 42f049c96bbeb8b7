"""Sending pace shared by every worker process and host: global and per-domain limits.

SPEC section 5 ("Sending pace"). Around each SMTP transaction a worker calls::

    permit = await pace.acquire(domain, n=len(recipients))   # waits for its turn
    try:
        result = await transport.send(envelope)
    except BaseException:
        await pace.release(permit)
        raise
    await pace.release(permit, result.code, result.response, result.stage)  # a 421 slows

:meth:`Pace.acquire` waits until the global bucket (``MAILER_SMTP_MAX_RATE``), the
domain's bucket and the domain's concurrency (``MAILER_DOMAIN_LIMITS``) all allow the
transaction, and takes from all three at once or from none. :meth:`Pace.release` frees
the slot, and a throttling reply (:func:`is_throttling`) halves the domain's pace
(:mod:`mailer.smtp.bucket` has the rules), or, when it is about our account at the relay
rather than the recipient's domain (:func:`is_relay_throttling`), the global pace that
every domain shares, by the same rules. :meth:`Pace.defer_hint` tells a worker how long
to put a slowed domain's queued mail aside as a group (all mail, while the relay is
slowed) instead of making each message wait or retry on its own.

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
from mailer.smtp.replies import Stage

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
# Replies that name a limit of the *sending account* at the relay, not of a recipient:
# Amazon SES ("Maximum sending rate exceeded", "Daily message quota exceeded"), SendGrid
# ("exceeded your messaging limits"), Microsoft 365 SMTP submission ("Concurrent
# connections limit exceeded", "sender thread limit exceeded"), and the generic wordings
# of per-second, daily and relay quotas. With any 4xx code they are throttling replies too.
_ACCOUNT_LIMIT_TEXT = re.compile(
    r"\bmax(?:imum)?\s+send(?:ing)?\s+rate\b"
    r"|\b(?:send(?:ing)?|relay|account|messaging)\s+(?:quota|limits?)\b"
    r"|\b(?:daily|hourly|monthly)\s+(?:[\w-]+\s+){0,2}?(?:quota|limit)\b"
    r"|\bmessages?\s+per\s+(?:second|minute|hour|day)\s+(?:quota|limit)\b"
    r"|\bconcurrent\s+connections?\s+limit\b|\bsender\s+thread\s+limit\b",
    re.IGNORECASE,
)
#: Stages at which no recipient has been named yet: a refusal there cannot be about one.
_BEFORE_ANY_RECIPIENT = frozenset({Stage.CONNECT, Stage.MAIL})


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
    if _RATE_TEXT.search(text) or _ACCOUNT_LIMIT_TEXT.search(text):
        return True
    return subject == 7 and _TRY_LATER.search(text) is not None


def is_relay_throttling(code: int | None, text: str, stage: Stage | None) -> bool:
    """Whether a throttling reply is about our account at the relay, so every domain slows.

    All mail goes through one relay (``MAILER_SMTP_HOST``). A throttling reply
    (:func:`is_throttling`) given before any recipient was named (at the greeting, EHLO,
    AUTH or MAIL FROM: RFC 5321 section 3.3 names recipients only at RCPT) cannot be about
    a recipient's domain; nor can one whose text names the sending account's rate or quota
    (Amazon SES answers "454 Throttling failure: Maximum sending rate exceeded." after
    DATA). Other throttling replies, at RCPT or DATA, concern the recipient's domain only.
    """
    if not is_throttling(code, text):
        return False
    return stage in _BEFORE_ANY_RECIPIENT or _ACCOUNT_LIMIT_TEXT.search(text) is not None


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
    #: The global pace now: ``MAILER_SMTP_MAX_RATE``, lower while the relay is slowed;
    #: None when neither configured nor slowed.
    relay_rate: float | None = None
    #: Whether a relay-wide throttling reply (:func:`is_relay_throttling`) holds every
    #: domain below the global rate.
    relay_slowed: bool = False
    #: Seconds until the global pace is back at its configured rate (0.0 when not slowed).
    relay_recovers_in: float = 0.0
    #: Seconds until the global bucket has a token for one more message.
    relay_next_in: float = 0.0

    @property
    def hold(self) -> float:
        """Seconds to put this domain's queued mail aside as a group; 0.0 if not slowed.

        SPEC 5: while a domain is slowed its mail waits as a group; while the relay is
        slowed, so does every domain's. The longer of the two waits applies.
        """
        return max(self._domain_hold, self._relay_hold)

    @property
    def hold_reason(self) -> str:
        """Why :attr:`hold` holds the mail back, for the deferred message's response text."""
        if self.relay_slowed and self._relay_hold >= self._domain_hold:
            return "the relay is slowed after quota or throttling replies"
        return "the recipient domain is slowed after throttling replies"

    @property
    def _domain_hold(self) -> float:
        return max(self.recovers_in, self.next_in) if self.slowed else 0.0

    @property
    def _relay_hold(self) -> float:
        return max(self.relay_recovers_in, self.relay_next_in) if self.relay_slowed else 0.0


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

    def relay_base_rate(self) -> float:
        """The rate the global pace is halved from and recovers to after a relay-wide reply."""
        # MAILER_SMTP_MAX_RATE when set: it is the operator's statement of the relay's quota,
        # the pace we are allowed and should return to. Unset, the relay's quota is unknown
        # and "unlimited" cannot be halved, so the global pace starts from the same nominal
        # rate an unlimited domain is slowed from (bucket.DEFAULT_UNLIMITED_DOMAIN_RATE):
        # throttling replies that keep coming halve it once a second, down to a few per
        # second within seconds, and once it recovers the global pace is unlimited again.
        return bucket.throttle_base(self.max_rate, None)


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
    async def release(self, permit: Permit, code: int | None = None, text: str = "",
                      stage: Stage | None = None) -> bool:
        """Free the permit's slot; report the reply and where the attempt ended.

        True when the reply slowed the domain down, or (:func:`is_relay_throttling`) the
        global pace of every domain.
        """

    @abc.abstractmethod
    async def status(self, domain: str) -> DomainStatus:
        """The domain's pace right now, and the relay's (the global pace)."""

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
        """Seconds to put a slowed domain's queued mail aside as a group; 0.0 if not slowed.

        While the relay is slowed every domain's mail waits as well (DomainStatus.hold).
        """
        return (await self.status(domain)).hold

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
        self._relay_slowdown: Slowdown | None = None
        self._domains: dict[str, _DomainState] = {}

    def _relay_rate(self, now: float) -> float | None:
        """The global pace now, dropping a finished relay slowdown; None when unlimited."""
        base = self.limits.relay_base_rate()
        if bucket.recovered(base, self._relay_slowdown, now, self.limits.recovery):
            self._relay_slowdown = None
        if self._relay_slowdown is not None:
            return bucket.current_rate(base, self._relay_slowdown, now, self.limits.recovery)
        return self.limits.max_rate

    def _slowed(self, base: float, slowdown: Slowdown | None, current: Bucket | None,
                rate: float | None, now: float) -> tuple[Slowdown, Bucket] | None:
        """The slowdown and bucket after a throttling reply; None if halved under 1 s ago."""
        after = bucket.slow_down(base, slowdown, now, self.limits.recovery)
        if after is None or after is slowdown:
            return None  # halved less than a second ago: the same signal again
        # SPEC 5: new transactions wait. Keep any debt, drop any saved-up burst.
        tokens = 0.0
        if current is not None and rate is not None:
            tokens = min(bucket.refill(current, rate, now).tokens, 0.0)
        return after, Bucket(tokens, now)

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
        global_rate = self._relay_rate(now)
        if global_rate is not None:
            start = self._global or Bucket.full(global_rate, now)
            global_after, global_wait = bucket.take(start, n, global_rate, now)
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

    async def release(self, permit: Permit, code: int | None = None, text: str = "",
                      stage: Stage | None = None) -> bool:
        """Free the permit's slot; report the reply. True when it slowed a pace down."""
        now = self._clock()
        state, rate = self._state(permit.domain, now)
        state.leases.pop(permit.token, None)
        if not is_throttling(code, text):
            return False
        if is_relay_throttling(code, text, stage):
            # About our account at the relay: every domain's mail slows, this one's no more.
            relay = self._slowed(self.limits.relay_base_rate(), self._relay_slowdown,
                                 self._global, self._relay_rate(now), now)
            if relay is None:
                return False
            self._relay_slowdown, self._global = relay
            return True
        domain = self._slowed(self.limits.base_rate(permit.domain), state.slowdown,
                              state.bucket, rate, now)
        if domain is None:
            return False
        state.slowdown, state.bucket = domain
        return True

    async def status(self, domain: str) -> DomainStatus:
        """The domain's pace right now, and the relay's (the global pace)."""
        domain = normalise_domain(domain)
        now = self._clock()
        state, rate = self._state(domain, now)
        relay_rate = self._relay_rate(now)
        relay_recovers_in = bucket.recovery_time(self.limits.relay_base_rate(),
                                                 self._relay_slowdown, now, self.limits.recovery)
        relay_next_in = 0.0
        if relay_rate is not None:
            start = self._global or Bucket.full(relay_rate, now)
            relay_next_in = bucket.wait_for(start, 1, relay_rate, now)
        own: tuple[float | None, bool, float, float] = (None, False, 0.0, 0.0)
        if rate is not None:
            base = self.limits.base_rate(domain)
            recovers_in = bucket.recovery_time(base, state.slowdown, now, self.limits.recovery)
            next_in = bucket.wait_for(state.bucket or Bucket.full(rate, now), 1, rate, now)
            own = (rate, state.slowdown is not None, recovers_in, next_in)
        return DomainStatus(*own, relay_rate, self._relay_slowdown is not None,
                            relay_recovers_in, relay_next_in)
