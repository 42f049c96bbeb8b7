"""The one module that sets dramatiq's global broker (STYLE: exactly one place).

Nothing happens on import: the worker's entry point (:mod:`workers.actors`) calls
:func:`set_broker` once with its :class:`Settings`, before it declares the actors.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from mailer.config import Settings


def set_broker(settings: Settings) -> RedisBroker:
    """Make a Redis broker for ``settings.redis_url`` dramatiq's global one, and return it."""
    # Retries stay installed with max_retries=0 on our actors: the database's attempt
    # counter and the outbox sweeper own retrying, because a SIGKILLed worker skips
    # dramatiq's count.
    broker = RedisBroker(  # type: ignore[no-untyped-call]
        url=settings.redis_url,
        middleware=[AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(), Pipelines(),
                    Retries(max_retries=0)],
    )
    dramatiq.set_broker(broker)
    return broker
