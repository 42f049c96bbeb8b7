"""dramatiq actors: the send worker. Run with ``dramatiq workers.actors``."""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
from redis import Redis

from mailer.config import load_or_exit
from mailer.mail.dkim import DkimSigner
from mailer.mail.mime import MessageBuilder
from mailer.metrics.shared import SMTP_SECONDS, Publisher
from mailer.runtime import Runtime
from mailer.sending.dispatch import Dispatcher
from mailer.sending.queue import SEND_ACTOR, SEND_QUEUE, BrokerEnqueuer
from mailer.smtp.bridge import BlockingTransport
from mailer.smtp.paced import transport_from_settings
from workers.broker import set_broker

log = logging.getLogger(__name__)

# SPEC 6: a bad setting stops the worker at start-up (one line on stderr, exit 2). The
# broker is set before the actor below is declared, which binds it to the global broker.
settings = load_or_exit()
set_broker(settings)

_lock = threading.Lock()
_dispatcher: Dispatcher | None = None
#: The worker threads of this process (``dramatiq --threads``), known at worker boot.
_threads = 8


def dispatcher() -> Dispatcher:
    """The process's dispatcher, built on first use (after dramatiq forks its workers)."""
    global _dispatcher
    with _lock:
        if _dispatcher is None:
            # One database connection per worker thread, plus one for a stored-template
            # lookup made while a thread holds its own (docs/capacity.md sizes PostgreSQL).
            runtime = Runtime.from_settings(settings, BrokerEnqueuer(settings.broker_url),
                                            pool_size=_threads + 1)
            transport = BlockingTransport(lambda: transport_from_settings(settings))
            builder = MessageBuilder(settings.mail_from, settings.reply_to,
                                     DkimSigner.from_settings(settings))
            _dispatcher = Dispatcher(runtime, transport, builder, retry_base=settings.retry_base)
        return _dispatcher


class SizePool(dramatiq.Middleware):
    """Learn the process's worker thread count, which sizes its database pool."""

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        """Remember ``worker.worker_threads``."""
        global _threads
        _threads = int(worker.worker_threads)


dramatiq.get_broker().add_middleware(SizePool())


class PublishMetrics(dramatiq.Middleware):
    """SPEC 7: a worker process's SMTP timings reach the API's /metrics through Redis.

    Published every few seconds from a thread, and once more when the worker stops: its
    process ends with ``os._exit``, so an ``atexit`` hook would never run.
    """

    def __init__(self) -> None:
        self.publisher: Publisher | None = None

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        """Start publishing."""
        client: Redis[bytes] = Redis.from_url(settings.redis_url, socket_timeout=2,
                                              socket_connect_timeout=2)
        self.publisher = Publisher(client, [SMTP_SECONDS])
        self.publisher.start()

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        """Publish what the last messages observed."""
        if self.publisher is not None:
            self.publisher.stop()


dramatiq.get_broker().add_middleware(PublishMetrics())


# time_limit (10 min) stays below the 2 m lease x attempts and the heartbeat settings; an
# SMTP timeout (30 s) fires long before it.
@dramatiq.actor(actor_name=SEND_ACTOR, queue_name=SEND_QUEUE, max_retries=0,
                time_limit=600_000)
def send_messages(ids: list[str]) -> None:
    """Send a chunk of outbox messages by id."""
    report = dispatcher().run(ids)
    log.info("chunk done: claimed=%d outcomes=%s", report.claimed, report.outcomes)
