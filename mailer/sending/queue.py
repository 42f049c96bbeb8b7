"""Hand message ids to the workers through dramatiq's Redis broker.

The queue carries only ids (SPEC 5): the database row is the message. Ids travel in
chunks, so one queue message moves up to :data:`CHUNK` sends (measured: dramatiq costs
0.3-0.75 ms per queue message, so per-message enqueue would dominate the send path).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import dramatiq
from dramatiq.brokers.redis import RedisBroker

#: The dramatiq queue and actor that send messages (defined in ``workers.actors``).
SEND_QUEUE = "send"
SEND_ACTOR = "send_messages"
#: Ids per queue message.
CHUNK = 100

log = logging.getLogger(__name__)


class Enqueuer(Protocol):
    """Something that hands message ids to the workers."""

    def enqueue(self, ids: Sequence[str], delay_ms: int | None = None) -> bool:
        """Enqueue ``ids``; return False (never raise) when the queue is unreachable."""
        ...


class RedisEnqueuer:
    """Enqueue to the Redis broker without touching dramatiq's global broker."""

    def __init__(self, redis_url: str) -> None:
        self.broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]
        self.broker.declare_queue(SEND_QUEUE)

    def enqueue(self, ids: Sequence[str], delay_ms: int | None = None) -> bool:
        """Enqueue ``ids`` in chunks; a Redis outage is logged and left to the sweeper."""
        try:
            for start in range(0, len(ids), CHUNK):
                message: dramatiq.Message[None] = dramatiq.Message(
                    queue_name=SEND_QUEUE,
                    actor_name=SEND_ACTOR,
                    args=(list(ids[start : start + CHUNK]),),
                    kwargs={},
                    options={},
                )
                self.broker.enqueue(message, delay=delay_ms)
        except Exception as exc:  # any broker failure: the outbox sweeper re-enqueues
            log.warning("enqueue failed, the sweeper will retry: %s", type(exc).__name__)
            return False
        return True

    def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(self.broker.client.ping())
        except Exception:
            return False

    def close(self) -> None:
        """Release the connection pool."""
        self.broker.close()


class ListEnqueuer:
    """An in-memory enqueuer for unit tests of the core."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[str], int | None]] = []

    def enqueue(self, ids: Sequence[str], delay_ms: int | None = None) -> bool:
        """Remember the ids."""
        self.batches.append((list(ids), delay_ms))
        return True
