"""One mail transaction on a pooled connection: MAIL, RCPT, DATA (RFC 5321 section 3.3).

Each reply is checked on its own so the failing stage is known, and reported as a plain
:class:`~mailer.smtp.replies.SendResult`; what a reply means is decided in
:mod:`mailer.smtp.replies`, never here. :func:`transact` also says whether the connection
may carry another transaction, which :class:`~mailer.smtp.pool.SmtpTransport` acts on.
"""

from __future__ import annotations

import time

import aiosmtplib
from aiosmtplib import SMTPStatus

from mailer.metrics.shared import SMTP_SECONDS
from mailer.smtp.connection import PooledConnection
from mailer.smtp.replies import (
    EnvelopeLike,
    Outcome,
    SendResult,
    Stage,
    all_refused,
    local_failure,
    reply,
)


def _failure(smtp: aiosmtplib.SMTP, exc: Exception, stage: Stage, local: Outcome) -> SendResult:
    """Turn what one step raised into a result; anything but a 4xx/5xx reply is ``local``."""
    if isinstance(exc, aiosmtplib.SMTPResponseException) and 400 <= exc.code < 600:
        return reply(exc.code, exc.message, stage)
    # Lost, timed out, or a reply we cannot read (the session is out of step): never reuse.
    smtp.close()
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return SendResult(local, None, f"unexpected reply {exc.code}", stage)
    return local_failure(exc, stage, local)


async def transact(conn: PooledConnection, envelope: EnvelopeLike) -> tuple[SendResult, bool]:
    """Run MAIL, RCPT, DATA, each reply checked on its own so the failing stage is known."""
    began = time.monotonic()
    try:
        if conn.link is not None:
            result = await conn.link.transact(envelope)
        else:
            result = await _mail_rcpt_data(conn.smtp, envelope)
    except BaseException:
        # Cancelled mid-transaction: the protocol state is unknown, so never reuse it.
        conn.close()
        raise
    finally:
        conn.transactions += 1
        conn.last_used = time.monotonic()
    # SPEC 7: mailer_smtp_seconds, in memory here; the worker publishes it (metrics.shared).
    SMTP_SECONDS.observe(conn.last_used - began)
    if not conn.is_connected:
        return result, False
    if result.outcome is Outcome.SENT:
        return result, True
    if result.code == SMTPStatus.domain_unavailable:
        return result, False  # 421: the server is closing the channel (RFC 5321 3.8)
    # RFC 5321 section 4.1.1.5: RSET clears a failed or half-built transaction.
    try:
        await conn.rset()
    except (aiosmtplib.SMTPException, OSError):
        return result, False
    return result, True


async def _mail_rcpt_data(smtp: aiosmtplib.SMTP, envelope: EnvelopeLike) -> SendResult:
    options: list[str] = []
    if not envelope.data.isascii() and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152 section 3
    try:
        await smtp.mail(envelope.sender, options=options)
    except (aiosmtplib.SMTPException, OSError) as exc:
        return _failure(smtp, exc, Stage.MAIL, Outcome.DEFERRED)

    refused: list[tuple[str, SendResult]] = []
    for recipient in envelope.recipients:
        try:
            await smtp.rcpt(recipient)
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Nothing of the message went out yet, so a retry cannot duplicate it.
            result = _failure(smtp, exc, Stage.RCPT, Outcome.DEFERRED)
            if result.code is None or result.code == SMTPStatus.domain_unavailable:
                return result  # lost, or 421 closing: the whole attempt is deferred
            refused.append((recipient, result))
    if len(refused) == len(envelope.recipients):
        return all_refused(refused)

    try:
        response = await smtp.data(envelope.data)
    except (aiosmtplib.SMTPException, OSError) as exc:
        # RFC 5321 section 6.1: once the data is on the wire a lost reply does not mean
        # a lost message; the server may already hold it, so this must not be "failed"
        # and a blind resend may duplicate it.
        return _failure(smtp, exc, Stage.DATA, Outcome.UNKNOWN)
    return SendResult(Outcome.SENT, response.code, response.message, None, tuple(refused))
