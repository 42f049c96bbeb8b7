"""The one module that sets dramatiq's global broker (STYLE: exactly one place).

Nothing happens on import: the worker's entry point (:mod:`workers.actors`) calls
:func:`set_broker` once with its :class:`Settings`, before it declares the actors.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from mailer.config import Settings
from mailer.sending.queue import make_broker


def set_broker(settings: Settings) -> Any:
    """Make the broker of ``MAILER_BROKER_URL`` (Redis or RabbitMQ) dramatiq's global one,
    and return it."""
    # Retries stay installed with max_retries=0 on our actors: the database's attempt
    # counter and the outbox sweeper own retrying, because a SIGKILLed worker skips
    # dramatiq's count.
    broker = make_broker(
        settings.broker_url,
        middleware=[AgeLimit(), TimeLimit(), ShutdownNotifications(), Callbacks(), Pipelines(),
                    Retries(max_retries=0)],
    )
    dramatiq.set_broker(broker)
    return broker
