"""Hand message ids to the workers through dramatiq's broker: Redis or RabbitMQ.

The queue carries only ids (SPEC 5): the database row is the message. Ids travel in
chunks, so one queue message moves up to :data:`CHUNK` sends (measured: dramatiq costs
0.3-0.75 ms per queue message, so per-message enqueue would dominate the send path).

Which broker is a deployment choice (``MAILER_BROKER_URL``, SPEC 10); the guarantees do
not depend on it. Either way the enqueue happens after the row's commit and a lost queue
message is re-sent by the outbox sweeper, so the broker only has to be fast, not durable.
It is durable all the same: RabbitMQ queues are declared durable and messages persistent
(dramatiq does both), and :func:`make_broker` turns publisher confirms on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dramatiq
from dramatiq.brokers.redis import RedisBroker

#: The dramatiq queue and actor that send messages (defined in ``workers.actors``).
SEND_QUEUE = "send"
SEND_ACTOR = "send_messages"
#: Ids per queue message.
CHUNK = 100
#: URL schemes that name RabbitMQ (AMQP 0-9-1).
AMQP_SCHEMES = ("amqp", "amqps")
#: pika connection settings added to an ``amqp://`` URL that does not set them itself.
#: pika waits forever on a broker that blocks publishers (a disk or memory alarm), and an
#: API request must not: after ``blocked_connection_timeout`` s the enqueue fails and the
#: sweeper takes over. ``socket_timeout`` bounds a connect to an unreachable host.
AMQP_DEFAULTS = {"socket_timeout": "5", "blocked_connection_timeout": "10",
                 "connection_attempts": "1"}

log = logging.getLogger(__name__)


class Enqueuer(Protocol):
    """Something that hands message ids to the workers."""

    def enqueue(self, ids: Sequence[str], delay_ms: int | None = None) -> bool:
        """Enqueue ``ids``; return False (never raise) when the queue is unreachable."""
        ...


def is_amqp(url: str) -> bool:
    """True when ``url`` names a RabbitMQ broker."""
    return urlsplit(url).scheme in AMQP_SCHEMES


def amqp_url(url: str) -> str:
    """``url`` with :data:`AMQP_DEFAULTS` added for the settings it leaves out."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name, value in AMQP_DEFAULTS.items():
        query.setdefault(name, value)
    return urlunsplit(parts._replace(query=urlencode(query)))


def make_broker(url: str, middleware: list[Any] | None = None) -> Any:
    """A dramatiq broker for ``url``: RabbitMQ for ``amqp(s)://``, else Redis.

    ``middleware=None`` gives dramatiq's default set (what a worker wants); an enqueuer
    passes an empty list, since no middleware acts on enqueue.
    """
    if is_amqp(url):
        # Imported here: pika is needed only by deployments that use RabbitMQ.
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        # Publisher confirms: enqueue returns once RabbitMQ has taken responsibility for
        # the (persistent) message, and an unroutable one raises instead of vanishing.
        return RabbitmqBroker(url=amqp_url(url), confirm_delivery=True,
                              middleware=middleware)
    return RedisBroker(url=url, middleware=middleware)  # type: ignore[no-untyped-call]


class BrokerEnqueuer:
    """Enqueue through a broker of its own, without touching dramatiq's global broker.

    Safe to share between threads: the Redis broker pools connections, and the RabbitMQ
    broker keeps one connection per thread.
    """

    def __init__(self, url: str) -> None:
        self.broker: Any = make_broker(url, middleware=[])
        self.amqp = is_amqp(url)
        self.broker.declare_queue(SEND_QUEUE)

    def enqueue(self, ids: Sequence[str], delay_ms: int | None = None) -> bool:
        """Enqueue ``ids`` in chunks; a broker outage is logged and left to the sweeper."""
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
        """True when the broker answers."""
        if not self.amqp:
            try:
                return bool(self.broker.client.ping())
            except Exception:
                return False
        # This thread's connection may be a stale one from before a broker restart: drop
        # it and try once more on a fresh one.
        for _ in range(2):
            try:
                self.broker.connection.process_data_events(time_limit=0)
                return True
            except Exception:
                with contextlib.suppress(Exception):
                    del self.broker.connection
        return False

    def close(self) -> None:
        """Release the broker's connections."""
        self.broker.close()


class RedisEnqueuer(BrokerEnqueuer):
    """A :class:`BrokerEnqueuer` on a ``redis://`` URL (the name older callers use)."""


class ListEnqueuer:
    """An in-memory enqueuer for unit tests of the core."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[str], int | None]] = []

    def enqueue(self, ids: Sequence[str], delay_ms: int | None = None) -> bool:
        """Remember the ids."""
        self.batches.append((list(ids), delay_ms))
        return True
