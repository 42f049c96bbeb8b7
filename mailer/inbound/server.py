"""``mailer inbound``: the SMTP server the inbound domain's MX points at (SPEC 12).

RCPT is accepted only for ``bounces+TOKEN@``, ``unsubscribe+TOKEN@`` (valid tokens),
``fbl@`` and ``postmaster@`` at ``MAILER_INBOUND_DOMAIN``; anything else there is
``550 5.1.1``, and an address at another domain is refused (we relay nothing). Messages over
10 MB are ``552``. DATA is answered ``250`` only once every recipient's effect is committed
(or the message is durably stored), and ``451`` on any internal error, so the sending MTA
keeps the message and retries: nothing it was told we took is lost.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer.config import Settings
from mailer.inbound.addresses import Target
from mailer.inbound.delivery import InboundDelivery
from mailer.runtime import Runtime, stop_on_signals

log = logging.getLogger("mailer.inbound")

#: RFC 5321 4.5.3.1.7 allows any size limit; bounces with an attached original are small,
#: and 10 MB is what mailbox providers accept as a whole message (SPEC 12).
MAX_MESSAGE = 10 * 1024 * 1024
#: RFC 5321 4.5.3.1.8: a server must accept at least 100 recipients per transaction.
MAX_RECIPIENTS = 100
#: Messages worked on at once (each in a thread, with its own database connection).
MAX_CONCURRENT = 4


class InboundHandler:
    """aiosmtpd handler: check each RCPT, apply each message, answer after the commit."""

    def __init__(self, delivery: InboundDelivery) -> None:
        self.delivery = delivery
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept our four mailboxes only (RFC 5321 4.5.1 postmaster included)."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        if self.delivery.target(address) is None:
            if not self.delivery.is_ours(address):
                return "550 5.7.1 Relaying denied"
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope,
    ) -> str:
        """Apply the message for every accepted recipient; 250 only after the commit."""
        raw = envelope.original_content or envelope.content
        data = raw if isinstance(raw, bytes) else str(raw or "").encode("utf-8", "surrogateescape")
        targets = [t for t in (self.delivery.target(a) for a in envelope.rcpt_tos) if t]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._deliver_all, targets, data)
        except Exception as exc:
            # No address, token or body in the log (privacy); the class says what broke.
            log.warning("inbound message not taken (451): %s", type(exc).__name__)
            return "451 4.3.0 Temporary failure, please try again later"
        return "250 2.0.0 OK"

    def _deliver_all(self, targets: list[Target], data: bytes) -> None:
        with self._slots:
            for target in targets:
                done = self.delivery.deliver(target, data)
                log.info("inbound %s: %s", done.mailbox, done.summary)


def quiet_protocol_log() -> None:
    """Keep aiosmtpd's protocol log (``mail.log``) to warnings: at INFO it logs every
    MAIL FROM and RCPT TO, addresses and VERP tokens included (no addresses in logs)."""
    logging.getLogger("mail.log").setLevel(logging.WARNING)


class InboundServer:
    """The listener on ``MAILER_INBOUND_HOST:PORT``, started and stopped in its own thread."""

    def __init__(self, rt: Runtime, host: str | None = None, port: int | None = None) -> None:
        settings = rt.settings
        self.handler = InboundHandler(InboundDelivery(rt))
        domain = settings.inbound_domain or "localhost"
        kwargs: dict[str, Any] = {
            "hostname": host or settings.inbound_host,
            "port": settings.inbound_port if port is None else port,
            "data_size_limit": MAX_MESSAGE,
            "server_hostname": domain,
            "ident": "mailer inbound",
        }
        self.controller = Controller(self.handler, **kwargs)

    def start(self) -> None:
        """Start listening (returns once the socket is bound)."""
        self.controller.start()

    def stop(self) -> None:
        """Stop listening; transactions in flight are cut off before their 250."""
        self.controller.stop()


def run(settings: Settings | None = None, stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``); idle with a log line when unconfigured."""
    settings = settings or Settings.from_environ()
    stop = stop_on_signals(stop)
    if not settings.inbound_domain:
        # SPEC 11: the Procfile always starts this process; without a domain it has
        # nothing to listen for, and must not crash-loop.
        log.info("MAILER_INBOUND_DOMAIN is not set: inbound listener idle")
        stop.wait()
        return
    rt = Runtime.from_settings(settings)
    quiet_protocol_log()
    server = InboundServer(rt)
    server.start()
    log.info("inbound listener on %s:%d", settings.inbound_host, settings.inbound_port)
    try:
        stop.wait()
    finally:
        server.stop()
        log.info("inbound listener stopped")
