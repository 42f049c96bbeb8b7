"""A pool of reused SMTP connections to one relay, over aiosmtplib (SPEC 5, 6).

Each attempt is reported as a plain :class:`~mailer.smtp.replies.SendResult`; what a
reply means is decided in :mod:`mailer.smtp.replies`, never here. When the relay offers
PIPELINING (RFC 2920), a connection's transactions go through
:class:`~mailer.smtp.pipelining.Link` (two round trips per message instead of four);
otherwise through aiosmtplib's commands one at a time. The session itself is
:class:`~mailer.smtp.connection.PooledConnection`; one transaction on it is
:func:`~mailer.smtp.transaction.transact`. This module opens, reuses and retires them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiosmtplib
from aiosmtplib import SMTPStatus

from mailer.smtp.connection import PooledConnection, tls_context
from mailer.smtp.helo import helo_name
from mailer.smtp.pipelining import Link
from mailer.smtp.replies import (
    EnvelopeLike,
    Outcome,
    SendResult,
    Stage,
    envelope_problem,
    local_failure,
    redacted,
    reply,
)
from mailer.smtp.transaction import transact

if TYPE_CHECKING:
    from mailer.config import Settings

__all__ = [
    "DEFAULT_CONNECT_BACKOFF",
    "DEFAULT_IDLE_CHECK_AFTER",
    "DEFAULT_MAX_CONNECTION_AGE",
    "DEFAULT_MAX_MESSAGES_PER_CONNECTION",
    "SmtpTransport",
    "tls_context",
]

logger = logging.getLogger(__name__)

#: An idle pooled connection older than this gets a NOOP before it carries a message.
DEFAULT_IDLE_CHECK_AFTER = 60.0

#: Like Postfix's ``smtp_connection_reuse_time_limit``: reopen connections older than this.
DEFAULT_MAX_CONNECTION_AGE = 300.0

#: Many relays cap transactions per session (and answer 421 past it), so reopen before that.
DEFAULT_MAX_MESSAGES_PER_CONNECTION = 100

#: After a failed connect, defer other sends at once for this long instead of each one
#: waiting out its own connect timeout against a relay that is down.
DEFAULT_CONNECT_BACKOFF = 5.0

#: Distinct relay refusals remembered for "logged once" (SPEC 5); beyond it, forget all.
_MAX_LOGGED_REFUSALS = 256


class _ConnectFailed(Exception):
    """Raised inside the pool when a new connection cannot be made ready."""

    def __init__(self, result: SendResult) -> None:
        super().__init__(result.response)
        self.result = result


class SmtpTransport:
    """A pool of reused SMTP connections to one relay; one instance per event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        security: str = "none",
        username: str | None = None,
        password: str | None = None,
        pool_size: int = 8,
        timeout: float = 30.0,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        idle_check_after: float = DEFAULT_IDLE_CHECK_AFTER,
        max_connection_age: float = DEFAULT_MAX_CONNECTION_AGE,
        max_messages_per_connection: int = DEFAULT_MAX_MESSAGES_PER_CONNECTION,
        connect_backoff: float = DEFAULT_CONNECT_BACKOFF,
        pipelining: bool = True,
    ) -> None:
        if security not in ("none", "starttls", "tls"):
            raise ValueError("security must be none, starttls or tls")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.host = host
        self.port = port
        self.security = security
        self.pool_size = pool_size
        self.timeout = timeout
        self._username = username
        self._password = password
        self._local_hostname = local_hostname
        self._tls_context = tls_context
        self._idle_check_after = idle_check_after
        self._max_age = max_connection_age
        self._max_transactions = max_messages_per_connection
        self._connect_backoff = connect_backoff
        #: Use RFC 2920 pipelining with servers that offer it (False: never).
        self.pipelining = pipelining
        self._connect_failure: tuple[float, SendResult] | None = None
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[PooledConnection] = []
        self._generation = 0
        self._logged: set[tuple[int | None, str, str]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpTransport:
        """Build the transport for the relay configured by ``MAILER_SMTP_*``."""
        return cls(
            settings.smtp_host,
            settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password,
            pool_size=settings.smtp_pool_size,
            timeout=settings.smtp_timeout,
            # SPEC 6: never "localhost", which relays refuse (RFC 5321 4.1.1.1).
            local_hostname=helo_name(settings.smtp_helo_name, settings.mail_from),
            tls_context=tls_context(settings.smtp_ca_file),
            # MAILER_SMTP_PIPELINING=false turns RFC 2920 off for a relay that offers it
            # but mishandles it (read when the settings carry it; on by default).
            pipelining=settings.smtp_pipelining,
        )

    async def send_many(self, envelopes: Sequence[EnvelopeLike]) -> list[SendResult]:
        """Send all envelopes concurrently (at most ``pool_size`` in flight); results in order."""
        return list(await asyncio.gather(*(self.send(envelope) for envelope in envelopes)))

    async def send(self, envelope: EnvelopeLike) -> SendResult:
        """Run one SMTP transaction on a pooled connection; never raises for SMTP trouble."""
        problem = envelope_problem(envelope)
        if problem is not None:
            return problem
        result = await self._send(envelope)
        if result.relay_error:
            self._log_refusal(result)
        return result

    async def _send(self, envelope: EnvelopeLike) -> SendResult:
        async with self._slots:
            try:
                conn = await self._checkout()
            except _ConnectFailed as exc:
                return exc.result
            reused = conn.transactions > 0
            result, reusable = await transact(conn, envelope)
            if reused and result.stage is Stage.MAIL and result.outcome is Outcome.DEFERRED and (
                result.code is None or result.code == SMTPStatus.domain_unavailable
            ):
                # A reused connection the server had quietly dropped (or closed with 421
                # on a per-session limit) fails at MAIL, before any message data left us;
                # one retry on a fresh connection is safe and avoids a needless deferral.
                self._discard(conn)
                try:
                    conn = await self._open()
                except _ConnectFailed as exc:
                    return exc.result
                result, reusable = await transact(conn, envelope)
            await self._checkin(conn, reusable)
            return result

    async def close(self) -> None:
        """Close every pooled connection; in-flight ones close when their send finishes."""
        self._generation += 1
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn) for conn in idle))

    # -- the pool ------------------------------------------------------------------------

    async def _checkout(self) -> PooledConnection:
        """Hand out the most recently used healthy idle connection, else open a new one."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # LIFO keeps the warm ones busy and lets extras age out
            if not self._still_good(conn, now):
                await self._quit(conn)
                continue
            if now - conn.last_used > self._idle_check_after:
                try:
                    await conn.noop()
                except (aiosmtplib.SMTPException, OSError):
                    self._discard(conn)
                    continue
            return conn
        return await self._open()

    def _still_good(self, conn: PooledConnection, now: float) -> bool:
        return (
            conn.generation == self._generation
            and conn.is_connected
            and now - conn.opened_at < self._max_age
            and conn.transactions < self._max_transactions
        )

    async def _checkin(self, conn: PooledConnection, reusable: bool) -> None:
        if not reusable:
            self._discard(conn)
        elif self._still_good(conn, time.monotonic()):
            self._idle.append(conn)
        else:
            await self._quit(conn)

    async def _open(self) -> PooledConnection:
        if self._connect_failure is not None:
            failed_at, failure = self._connect_failure
            if time.monotonic() - failed_at < self._connect_backoff:
                raise _ConnectFailed(failure)
        try:
            conn = await self._connect()
        except _ConnectFailed as exc:
            self._connect_failure = (time.monotonic(), exc.result)
            raise
        self._connect_failure = None
        return conn

    async def _connect(self) -> PooledConnection:
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password,
            local_hostname=self._local_hostname,
            timeout=self.timeout,
            use_tls=self.security == "tls",
            # "starttls" means required: aiosmtplib raises if the server does not offer it,
            # and we never retry in plaintext (a downgrade an attacker could force).
            start_tls=self.security == "starttls",
            tls_context=self._tls_context,
        )
        try:
            await smtp.connect()
            # aiosmtplib looks the FQDN up (a DNS query) per connection unless told it.
            self._local_hostname = smtp.local_hostname
            if smtp.is_ehlo_or_helo_needed:
                # Greet now so a refused EHLO is a connect problem, not a refused MAIL.
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await smtp.helo()
            link = None
            if self.pipelining and smtp.supports_extension("pipelining"):
                # RFC 2920 section 3.1: only a server that says so in its EHLO reply.
                link = Link(smtp, self.timeout)
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            # Greeting, EHLO, STARTTLS or AUTH refusals concern the relay, not this
            # message: retry (replies.blames_client marks all but 421 as relay errors).
            result = reply(exc.code, exc.message, Stage.CONNECT)
            if result.outcome is Outcome.FAILED:
                result = SendResult(Outcome.DEFERRED, exc.code, exc.message, Stage.CONNECT)
            if not result.relay_error:
                logger.warning("smtp connect to %s:%s refused: %s", self.host, self.port,
                               exc.code)
            raise _ConnectFailed(result) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            result = local_failure(exc, Stage.CONNECT, Outcome.DEFERRED)
            if not result.relay_error:
                logger.warning("smtp connect to %s:%s failed: %s", self.host, self.port,
                               result.response)
            raise _ConnectFailed(result) from None
        now = time.monotonic()
        return PooledConnection(smtp, self._generation, opened_at=now, last_used=now, link=link)

    def _log_refusal(self, result: SendResult) -> None:
        """Log a relay refusal once per distinct reply, without addresses (SPEC 5)."""
        text = redacted(result.response)
        key = (result.code, str(result.stage), text)
        if key in self._logged:
            return
        if len(self._logged) >= _MAX_LOGGED_REFUSALS:
            self._logged.clear()
        self._logged.add(key)
        logger.error(
            "relay %s:%s refused us (not the recipient) at %s: %s %s; messages stay "
            "deferred until the relay settings are fixed",
            self.host, self.port, result.stage, result.code or "-", text,
        )

    def _discard(self, conn: PooledConnection) -> None:
        conn.close()

    async def _quit(self, conn: PooledConnection) -> None:
        # QUIT is a courtesy (RFC 5321 section 4.1.1.10); a dead peer must not delay us.
        if conn.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await conn.quit(min(self.timeout, 5.0))
        conn.close()
