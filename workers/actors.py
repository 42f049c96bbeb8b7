"""dramatiq actors: the send worker. Run with ``dramatiq workers.actors``."""

from __future__ import annotations

import logging
import threading

import dramatiq

from mailer.mail.dkim import DkimSigner
from mailer.mail.mime import MessageBuilder
from mailer.runtime import Runtime
from mailer.sending.dispatch import Dispatcher
from mailer.sending.queue import SEND_ACTOR, SEND_QUEUE, RedisEnqueuer
from mailer.smtp.transport import BlockingTransport, SmtpTransport
from workers.broker import settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_dispatcher: Dispatcher | None = None


def dispatcher() -> Dispatcher:
    """The process's dispatcher, built on first use (after dramatiq forks its workers)."""
    global _dispatcher
    with _lock:
        if _dispatcher is None:
            runtime = Runtime.from_settings(settings, RedisEnqueuer(settings.redis_url))
            transport = BlockingTransport(lambda: SmtpTransport.from_settings(settings))
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
