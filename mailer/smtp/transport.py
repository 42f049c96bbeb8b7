"""Pooled SMTP delivery over aiosmtplib that reports each attempt as a plain :class:`SendResult`."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiosmtplib
from aiosmtplib import SMTPStatus

if TYPE_CHECKING:
    from mailer.config import Settings

logger = logging.getLogger(__name__)

#: Reply text kept in a :class:`SendResult` (it is stored with the message row).
MAX_RESPONSE_CHARS = 500

#: An idle pooled connection older than this gets a NOOP before it carries a message.
DEFAULT_IDLE_CHECK_AFTER = 60.0

#: Like Postfix's ``smtp_connection_reuse_time_limit``: reopen connections older than this.
DEFAULT_MAX_CONNECTION_AGE = 300.0

#: Many relays cap transactions per session (and answer 421 past it), so reopen before that.
DEFAULT_MAX_MESSAGES_PER_CONNECTION = 100

#: After a failed connect, defer other sends at once for this long instead of each one
#: waiting out its own connect timeout against a relay that is down.
DEFAULT_CONNECT_BACKOFF = 5.0

_T = TypeVar("_T")

# RFC 3463 section 2 / RFC 2034 section 4: "class.subject.detail" leads the reply text.
_ENHANCED_CODE = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
# Characters that end or smuggle an SMTP command argument (RFC 5321 section 4.1.2).
_FORBIDDEN_IN_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")
# RFC 3463 section 3.2: X.1.7 and X.1.8 are about the *sender's* address, never the recipient.
_SENDER_ADDRESS_STATUSES = frozenset({"1.7", "1.8"})


class Outcome(enum.StrEnum):
    """What one SMTP attempt means for the message."""

    SENT = "sent"
    #: Safe to retry: a 4xx reply, or the attempt died before the message data went out.
    DEFERRED = "deferred"
    #: A 5xx reply at MAIL, RCPT or DATA (or an envelope that can never be sent).
    FAILED = "failed"
    #: Lost during or after DATA: the server may have accepted it (RFC 5321 section 6.1).
    UNKNOWN = "unknown"


class Stage(enum.StrEnum):
    """The protocol step at which an attempt ended."""

    ENVELOPE = "envelope"
    CONNECT = "connect"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class EnvelopeLike(Protocol):
    """What the transport needs of a message: SMTP envelope plus the serialised bytes."""

    @property
    def sender(self) -> str: ...

    @property
    def recipients(self) -> tuple[str, ...]: ...

    @property
    def data(self) -> bytes: ...


@dataclass(frozen=True)
class SendResult:
    """The outcome of one attempt, with the server's reply code and text when there was one."""

    outcome: Outcome
    code: int | None
    response: str
    #: Where the attempt ended; None when it got through DATA.
    stage: Stage | None = None
    #: Recipients refused at RCPT while others were accepted (or all refused), each with
    #: its own result. Kept out of repr so a logged result never carries addresses.
    refused: tuple[tuple[str, SendResult], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if len(self.response) > MAX_RESPONSE_CHARS:
            object.__setattr__(self, "response", self.response[:MAX_RESPONSE_CHARS])

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code (``5.1.1``) that leads the reply, if any."""
        match = _ENHANCED_CODE.match(self.response)
        return match.group(1) if match else None

    @property
    def is_user_unknown(self) -> bool:
        """True for a permanent 5.1.x bad-recipient reply, which suppresses the address."""
        # Only enhanced codes count: bare 550 is also used for spam and policy refusals,
        # and 5.7.x is policy, never an unknown user.
        enhanced = self.enhanced
        if self.outcome is not Outcome.FAILED or self.code is None or not 500 <= self.code < 600:
            return False
        if enhanced is None or not enhanced.startswith("5.1."):
            return False
        # A refused MAIL FROM is about our sender address, not the recipient.
        return self.stage is not Stage.MAIL and enhanced[2:] not in _SENDER_ADDRESS_STATUSES


def _reply(code: int, message: str, stage: Stage) -> SendResult:
    # RFC 5321 section 4.2.1: 5yz is permanent, 4yz transient.
    outcome = Outcome.FAILED if 500 <= code < 600 else Outcome.DEFERRED
    return SendResult(outcome, code, message, stage)


def _failure(smtp: aiosmtplib.SMTP, exc: Exception, stage: Stage, local: Outcome) -> SendResult:
    """Turn what one step raised into a result; anything but a 4xx/5xx reply is ``local``."""
    if isinstance(exc, aiosmtplib.SMTPResponseException) and 400 <= exc.code < 600:
        return _reply(exc.code, exc.message, stage)
    # Lost, timed out, or a reply we cannot read (the session is out of step): never reuse.
    smtp.close()
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return SendResult(local, None, f"unexpected reply {exc.code}", stage)
    return SendResult(local, None, _describe(exc), stage)


def _describe(exc: BaseException) -> str:
    """A short, address-free description of a local (non-reply) failure."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return "TLS handshake failed"
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        return "timed out connecting"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError):
        return "connection lost"
    if isinstance(exc, aiosmtplib.SMTPException):
        return exc.message
    return type(exc).__name__


def _address_problem(address: str, *, may_be_empty: bool) -> str | None:
    if address == "":
        return None if may_be_empty else "empty recipient address"
    if not address.isascii():
        # SPEC section 6: addresses go out in ASCII form; we never negotiate SMTPUTF8.
        return "address is not ASCII"
    # aiosmtplib quotes through parseaddr, which silently truncates odd input instead of
    # rejecting it; refuse anything it would rewrite so the envelope is exactly as given.
    if _FORBIDDEN_IN_ADDRESS.search(address) or parseaddr(address)[1] != address:
        return "address not allowed on an SMTP command line"
    return None


def _envelope_problem(envelope: EnvelopeLike) -> SendResult | None:
    if not envelope.recipients:
        return SendResult(Outcome.FAILED, None, "no recipients", Stage.ENVELOPE)
    problems = [_address_problem(envelope.sender, may_be_empty=True)]
    problems += [_address_problem(r, may_be_empty=False) for r in envelope.recipients]
    for problem in problems:
        if problem is not None:
            return SendResult(Outcome.FAILED, None, problem, Stage.ENVELOPE)
    return None


class _ConnectFailed(Exception):
    """Raised inside the pool when a new connection cannot be made ready."""

    def __init__(self, result: SendResult) -> None:
        super().__init__(result.response)
        self.result = result


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    generation: int
    opened_at: float
    last_used: float
    transactions: int = 0


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
        self._connect_failure: tuple[float, SendResult] | None = None
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[_Connection] = []
        self._generation = 0

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
        )

    async def send_many(self, envelopes: Sequence[EnvelopeLike]) -> list[SendResult]:
        """Send all envelopes concurrently (at most ``pool_size`` in flight); results in order."""
        return list(await asyncio.gather(*(self.send(envelope) for envelope in envelopes)))

    async def send(self, envelope: EnvelopeLike) -> SendResult:
        """Run one SMTP transaction on a pooled connection; never raises for SMTP trouble."""
        problem = _envelope_problem(envelope)
        if problem is not None:
            return problem
        async with self._slots:
            try:
                conn = await self._checkout()
            except _ConnectFailed as exc:
                return exc.result
            reused = conn.transactions > 0
            result, reusable = await self._transact(conn, envelope)
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
                result, reusable = await self._transact(conn, envelope)
            await self._checkin(conn, reusable)
            return result

    async def close(self) -> None:
        """Close every pooled connection; in-flight ones close when their send finishes."""
        self._generation += 1
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn) for conn in idle))

    # -- one transaction -------------------------------------------------------------

    async def _transact(self, conn: _Connection, envelope: EnvelopeLike) -> tuple[SendResult, bool]:
        """Run MAIL, RCPT, DATA as separate steps so the failing stage is known."""
        smtp = conn.smtp
        try:
            result = await self._mail_rcpt_data(smtp, envelope)
        except BaseException:
            # Cancelled mid-transaction: the protocol state is unknown, so never reuse it.
            smtp.close()
            raise
        finally:
            conn.transactions += 1
            conn.last_used = time.monotonic()
        if not smtp.is_connected:
            return result, False
        if result.outcome is Outcome.SENT:
            return result, True
        if result.code == SMTPStatus.domain_unavailable:
            return result, False  # 421: the server is closing the channel (RFC 5321 3.8)
        # RFC 5321 section 4.1.1.5: RSET clears a failed or half-built transaction.
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError):
            return result, False
        return result, True

    async def _mail_rcpt_data(self, smtp: aiosmtplib.SMTP, envelope: EnvelopeLike) -> SendResult:
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
            return _all_refused(refused)

        try:
            response = await smtp.data(envelope.data)
        except (aiosmtplib.SMTPException, OSError) as exc:
            # RFC 5321 section 6.1: once the data is on the wire a lost reply does not mean
            # a lost message; the server may already hold it, so this must not be "failed"
            # and a blind resend may duplicate it.
            return _failure(smtp, exc, Stage.DATA, Outcome.UNKNOWN)
        return SendResult(Outcome.SENT, response.code, response.message, None, tuple(refused))

    # -- the pool ------------------------------------------------------------------------

    async def _checkout(self) -> _Connection:
        """Hand out the most recently used healthy idle connection, else open a new one."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # LIFO keeps the warm ones busy and lets extras age out
            if not self._still_good(conn, now):
                await self._quit(conn)
                continue
            if now - conn.last_used > self._idle_check_after:
                try:
                    await conn.smtp.noop()
                except (aiosmtplib.SMTPException, OSError):
                    self._discard(conn)
                    continue
            return conn
        return await self._open()

    def _still_good(self, conn: _Connection, now: float) -> bool:
        return (
            conn.generation == self._generation
            and conn.smtp.is_connected
            and now - conn.opened_at < self._max_age
            and conn.transactions < self._max_transactions
        )

    async def _checkin(self, conn: _Connection, reusable: bool) -> None:
        if not reusable:
            self._discard(conn)
        elif self._still_good(conn, time.monotonic()):
            self._idle.append(conn)
        else:
            await self._quit(conn)

    async def _open(self) -> _Connection:
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

    async def _connect(self) -> _Connection:
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
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            # Greeting, EHLO or AUTH refusals concern the relay, not this message: retry.
            logger.warning("smtp connect to %s:%s refused: %s", self.host, self.port, exc.code)
            raise _ConnectFailed(
                SendResult(Outcome.DEFERRED, exc.code, exc.message, Stage.CONNECT)
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            reason = _describe(exc)
            logger.warning("smtp connect to %s:%s failed: %s", self.host, self.port, reason)
            raise _ConnectFailed(
                SendResult(Outcome.DEFERRED, None, reason, Stage.CONNECT)
            ) from None
        now = time.monotonic()
        return _Connection(smtp, self._generation, opened_at=now, last_used=now)

    def _discard(self, conn: _Connection) -> None:
        conn.smtp.close()

    async def _quit(self, conn: _Connection) -> None:
        # QUIT is a courtesy (RFC 5321 section 4.1.1.10); a dead peer must not delay us.
        if conn.smtp.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await conn.smtp.quit(timeout=min(self.timeout, 5.0))
        conn.smtp.close()


def _all_refused(refused: list[tuple[str, SendResult]]) -> SendResult:
    """Summarise an attempt where no recipient was accepted."""
    # If any refusal was temporary, retrying may still reach that recipient.
    for _, result in refused:
        if result.outcome is Outcome.DEFERRED:
            break
    else:
        result = refused[0][1]
    return SendResult(result.outcome, result.code, result.response, Stage.RCPT, tuple(refused))


class BlockingTransport:
    """Synchronous façade: an event loop in a daemon thread driving one :class:`SmtpTransport`."""

    def __init__(self, factory: Callable[[], SmtpTransport]) -> None:
        # Create this in the process that uses it (after dramatiq forks its workers):
        # an event loop and its sockets do not survive fork.
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smtp-transport",
                                        daemon=True)
        self._thread.start()
        self._closed = False

        async def build() -> SmtpTransport:
            return factory()

        try:
            self._transport = self._run(build())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def transport(self) -> SmtpTransport:
        """The pooled async transport this façade drives (use it only on the loop thread)."""
        return self._transport

    def send(self, envelope: EnvelopeLike) -> SendResult:
        """Send one envelope and wait for its result; callable from any thread."""
        return self._run(self._transport.send(envelope))

    def send_many(self, envelopes: Sequence[EnvelopeLike]) -> list[SendResult]:
        """Send envelopes concurrently over the pool and wait; callable from any thread."""
        return self._run(self._transport.send_many(list(envelopes)))

    def close(self) -> None:
        """Close the pooled connections and stop the loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._transport.close(), checked=False)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, _T], *, checked: bool = True) -> _T:
        if checked and self._closed:
            coro.close()
            raise RuntimeError("BlockingTransport is closed")
        if os.getpid() != self._pid:
            coro.close()
            raise RuntimeError("BlockingTransport was created before fork; make one per process")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("BlockingTransport called from its own loop thread (deadlock)")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # The caller gave up (say, dramatiq's time limit fired): stop the sends rather
            # than let them finish unrecorded, which the sweeper would turn into duplicates.
            future.cancel()
            raise
