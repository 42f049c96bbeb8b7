"""dramatiq actors: the send worker. Run with ``dramatiq workers.actors``."""

from __future__ import annotations

import logging
import threading

import dramatiq

from mailer.config import load_or_exit
from mailer.mail.dkim import DkimSigner
from mailer.mail.mime import MessageBuilder
from mailer.runtime import Runtime
from mailer.sending.dispatch import Dispatcher
from mailer.sending.queue import SEND_ACTOR, SEND_QUEUE, RedisEnqueuer
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


def dispatcher() -> Dispatcher:
    """The process's dispatcher, built on first use (after dramatiq forks its workers)."""
    global _dispatcher
    with _lock:
        if _dispatcher is None:
            runtime = Runtime.from_settings(settings, RedisEnqueuer(settings.redis_url))
            transport = BlockingTransport(lambda: transport_from_settings(settings))
            builder = MessageBuilder(settings.mail_from, settings.reply_to,
                                     DkimSigner.from_settings(settings))
            _dispatcher = Dispatcher(runtime, transport, builder, retry_base=settings.retry_base)
        return _dispatcher


# time_limit (10 min) stays below the 2 m lease x attempts and the heartbeat settings; an
# SMTP timeout (30 s) fires long before it.
@dramatiq.actor(actor_name=SEND_ACTOR, queue_name=SEND_QUEUE, max_retries=0,
                time_limit=600_000)
def send_messages(ids: list[str]) -> None:
    """Send a chunk of outbox messages by id."""
    report = dispatcher().run(ids)
    log.info("chunk done: claimed=%d outcomes=%s", report.claimed, report.outcomes)
