"""The pool behind the sending pace: one permit per SMTP transaction (SPEC 5, "Sending pace").

Around each transaction :class:`PacedTransport` takes a permit from the shared
:class:`~mailer.smtp.pace.Pace` (global ``MAILER_SMTP_MAX_RATE``, per-domain
``MAILER_DOMAIN_LIMITS``) and gives it back with the reply and the stage it ended at, so
a throttling reply slows the whole recipient domain, or, when it is about our account at
the relay (:func:`~mailer.smtp.pace.is_relay_throttling`), every domain. A domain already
slowed is not contacted at all: its messages come back at once as deferred with
``retry_after`` (the pace's :attr:`~mailer.smtp.pace.DomainStatus.hold`), so they wait as
a group in the outbox instead of holding worker threads, and mail to other domains keeps
flowing unless the relay itself is slowed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from mailer.smtp.bridge import AsyncTransport
from mailer.smtp.limits import recipient_domain
from mailer.smtp.pace import (
    DEFAULT_ACQUIRE_TIMEOUT,
    Pace,
    PaceLimits,
    PaceTimeout,
    Permit,
    is_throttling,
)
from mailer.smtp.pool import SmtpTransport
from mailer.smtp.replies import EnvelopeLike, Outcome, SendResult, Stage, envelope_problem

if TYPE_CHECKING:
    from mailer.config import Settings

logger = logging.getLogger(__name__)

#: When the pace itself cannot answer (Redis down), retry after about this long.
PACE_UNAVAILABLE_RETRY = 30.0

# An acquire that took longer than this waited for its turn (one Redis round trip is ~1 ms).
_WAITED = 0.01


class PacedTransport:
    """An :class:`SmtpTransport` that asks the sending pace before every transaction."""

    def __init__(
        self,
        inner: SmtpTransport,
        pace: Pace,
        *,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.pace = pace
        self._acquire_timeout = acquire_timeout
        self._rng = rng or random.Random()

    async def send_many(self, envelopes: Sequence[EnvelopeLike]) -> list[SendResult]:
        """Send all envelopes concurrently, each when the pace allows; results in order."""
        return list(await asyncio.gather(*(self.send(envelope) for envelope in envelopes)))

    async def send(self, envelope: EnvelopeLike) -> SendResult:
        """Wait for a permit, run the transaction, report the reply; never raises for SMTP."""
        problem = envelope_problem(envelope)
        if problem is not None:
            return problem
        # The dispatcher sends one recipient per envelope; the first names the domain.
        domain = recipient_domain(envelope.recipients[0])
        try:
            state = await self.pace.status(domain)
            if state.hold > 0:
                return _held(state.hold_reason, state.hold)
            began = time.monotonic()
            permit = await self.pace.acquire(domain, len(envelope.recipients),
                                             timeout=self._acquire_timeout)
            if time.monotonic() - began > _WAITED:
                # It waited its turn: a throttling reply may have slowed the domain (or the
                # relay) since, and it must then wait with the group, not test the relay
                # once more.
                state = await self.pace.status(domain)
                if state.hold > 0:
                    await self._release(permit)
                    return _held(state.hold_reason, state.hold)
        except PaceTimeout:
            # Queued behind others for longer than the claim may last: back to the outbox.
            return _held("no sending slot within the wait limit",
                         self._acquire_timeout * self._rng.uniform(0.5, 1.0))
        except Exception as exc:  # Redis unreachable: defer rather than send unpaced
            logger.warning("sending pace unavailable: %s", type(exc).__name__)
            return _held("sending pace unavailable", PACE_UNAVAILABLE_RETRY)
        try:
            result = await self.inner.send(envelope)
        except BaseException:
            await self._release(permit)
            raise
        await self._release(permit, result.code, result.response, result.stage)
        if result.outcome is Outcome.DEFERRED and is_throttling(result.code, result.response):
            # SPEC 5: this message and the domain's (or, for a relay-wide reply, every
            # domain's) other queued mail wait as a group.
            try:
                wait = await self.pace.defer_hint(domain)
            except Exception:
                wait = 0.0
            if wait > 0:
                return replace(result, retry_after=wait)
        return result

    async def close(self) -> None:
        """Close the pooled connections and the pace's connections."""
        try:
            await self.inner.close()
        finally:
            await self.pace.close()

    async def _release(self, permit: Permit, code: int | None = None, text: str = "",
                       stage: Stage | None = None) -> None:
        try:
            await self.pace.release(permit, code, text, stage)
        except Exception as exc:  # the slot's lease expires on its own (pace.DEFAULT_LEASE)
            logger.warning("sending pace release failed: %s", type(exc).__name__)


def _held(why: str, seconds: float) -> SendResult:
    return SendResult(Outcome.DEFERRED, None, f"held back: {why}", Stage.PACE,
                      retry_after=max(seconds, 0.001))


def transport_from_settings(settings: Settings) -> AsyncTransport:
    """The worker's transport: the pool, behind a Redis-shared pace when one is configured.

    Build it on the event loop that will drive it (the Redis client binds to it).
    """
    inner = SmtpTransport.from_settings(settings)
    if settings.smtp_max_rate is None and not settings.domain_limits:
        return inner  # SPEC 10: unlimited by default, no Redis round trip per message
    from mailer.smtp.pace_redis import RedisPace

    limits = PaceLimits(max_rate=settings.smtp_max_rate, domains=settings.domain_limits)
    pace = RedisPace.from_url(settings.redis_url, limits)
    # A message claimed for sending holds its lease while it waits for a permit: give up
    # well before the lease ends, or the sweeper would hand it to a second worker.
    timeout = min(DEFAULT_ACQUIRE_TIMEOUT, settings.send_lease.total_seconds() / 2)
    return PacedTransport(inner, pace, acquire_timeout=timeout)
