"""SMTP command pipelining (RFC 2920) on a connection that aiosmtplib has opened.

aiosmtplib connects, greets, negotiates TLS and authenticates, but it cannot pipeline:
its protocol parses one reply per command and drops bytes that arrive while a parsed
reply waits to be picked up, which is exactly what a burst of pipelined replies looks
like. When the EHLO reply offers PIPELINING, :class:`Link` takes the connection over
(``transport.set_protocol``) and each transaction becomes two writes instead of four
round trips (RFC 2920 section 3.1: DATA may only end a group):

    MAIL FROM, RCPT TO ..., DATA   ->  their replies, read in order
    the message and the final dot  ->  the final reply

Every reply is checked, in order, and the outcome of each stage is classified as the
step-by-step path in :mod:`mailer.smtp.pool` classifies it: a refused MAIL is a refusal at
``mail`` (a relay error when it blames us), a refused RCPT a refusal of that recipient
with its own code, DATA must answer 354, and a reply lost after the message went out is
``unknown`` (RFC 5321 section 6.1). Before the message goes out nothing can have been
delivered, so a reply lost there is ``deferred``.
"""

from __future__ import annotations

import asyncio
import collections
import re
from typing import cast

import aiosmtplib

from mailer.smtp.replies import (
    EnvelopeLike,
    Outcome,
    SendResult,
    Stage,
    all_refused,
    local_failure,
    reply,
)

#: A reply: its code and its text (continuation lines joined with "\n", as aiosmtplib does).
Reply = tuple[int, str]

#: Bounds on what the server may send us, as aiosmtplib sets them: a line, and all the
#: replies not yet read (several whole replies may wait here when commands are pipelined).
MAX_LINE = 8192
MAX_PENDING = MAX_LINE * 4

_READY = 354  # "start mail input" (RFC 5321 section 4.2.2)
_OK = 250
_FORWARDED = 251  # "user not local; will forward" is an accepted recipient
_CLOSING = 421
# A line break in any spelling, as aiosmtplib normalises them: CRLF, LF, or a CR alone.
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")


def wire_data(data: bytes) -> bytes:
    """The DATA bytes as they go on the wire: CRLF line ends, dot-stuffed, then ".CRLF".

    Gives what aiosmtplib writes (a lone CR or LF becomes CRLF, a line starting with "."
    gets another, RFC 5321 section 4.5.2), but skips the regular expressions when the
    message is already in CRLF form, as built messages are.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_END.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    # Every LF now ends a CRLF, so "a line that starts with a dot" is exactly "\r\n.".
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class Link(asyncio.Protocol):
    """Our reader and writer for one connection, after aiosmtplib's set-up (EHLO, TLS, AUTH)."""

    def __init__(self, smtp: aiosmtplib.SMTP, timeout: float) -> None:
        transport = smtp.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._smtp = smtp
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # lines of a multi-line reply still arriving
        self._replies: collections.deque[Reply] = collections.deque()
        self._error: aiosmtplib.SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        #: RFC 6152: whether MAIL may say BODY=8BITMIME.
        self.eight_bit = smtp.supports_extension("8bitmime")
        # From here on every byte the server sends comes to data_received below; aiosmtplib
        # only sees the connection again in close().
        self._transport.set_protocol(self)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse every complete reply that arrived; wake the reader when it has enough."""
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buffer[start:end + 1])
            start = end + 1
            if len(line) > MAX_LINE or not line[:3].isdigit():
                # Not a reply: the session is out of step, and nothing it says can be trusted.
                self._fail(aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response"))
                return
            self._lines.append(line)
            if line[3:4] != b"-":
                lines, self._lines = self._lines, []
                text = b"\n".join(part[4:].strip(b" \t\r\n") for part in lines)
                self._replies.append((int(line[:3]), text.decode("utf-8", "surrogateescape")))
        if start:
            del buffer[:start]
        if len(buffer) + sum(map(len, self._lines)) > MAX_PENDING or (
            len(self._replies) > MAX_PENDING // 8
        ):
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            return
        waiter = self._waiter
        if waiter is not None and len(self._replies) >= self._wanted and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        """The server closed its side: no more replies will come."""
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone; a reader waiting for replies hears it at once."""
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)

    # -- state -----------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open, and in step: no error, and nothing arrived that no command asked for."""
        return (self._error is None and not self._transport.is_closing()
                and not self._replies and not self._buffer and not self._lines)

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = error
        if not self._transport.is_closing():
            self._transport.close()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            self._fail(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"))

    def close(self) -> None:
        """Close the connection (aiosmtplib's side too, which releases its state)."""
        if self._error is None:
            self._error = aiosmtplib.SMTPServerDisconnected("Connection closed")
        if not self._transport.is_closing():
            self._transport.close()
        self._smtp.close()

    # -- reading and writing -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes; raise if the connection is already unusable."""
        if self._error is not None:
            raise self._error
        if self._transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    async def read(self, count: int) -> tuple[list[Reply], aiosmtplib.SMTPException | None]:
        """Up to ``count`` replies in order, and the error that stopped short of ``count``.

        The timeout covers the wait for all of them: a pipelined group is one exchange.
        """
        if len(self._replies) < count and self._error is None:
            waiter = self._loop.create_future()
            self._waiter, self._wanted = waiter, count
            timer = self._loop.call_later(self._timeout, self._expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        replies = self._replies
        got = [replies.popleft() for _ in range(min(count, len(replies)))]
        if len(got) < count:
            error = self._error or aiosmtplib.SMTPServerDisconnected("Connection lost")
            return got, error
        return got, None

    async def command(self, line: bytes, expect: int = _OK) -> Reply:
        """Send one command and read its reply; raise unless it is ``expect``."""
        self.write(line)
        got, error = await self.read(1)
        if error is not None:
            raise error
        [(code, text)] = got
        if code != expect:
            raise aiosmtplib.SMTPResponseException(code, text)
        return code, text

    async def rset(self) -> None:
        """RSET (RFC 5321 section 4.1.1.5): clear a failed or half-built transaction."""
        await self.command(b"RSET\r\n")

    async def noop(self) -> None:
        """NOOP: check an idle connection before reuse."""
        await self.command(b"NOOP\r\n")

    async def quit(self) -> None:
        """QUIT politely (RFC 5321 section 4.1.1.10), then close."""
        try:
            await self.command(b"QUIT\r\n", expect=221)
        finally:
            self.close()

    # -- one transaction ---------------------------------------------------------------------

    async def transact(self, envelope: EnvelopeLike) -> SendResult:
        """MAIL, RCPT and DATA in one write; then the message; every reply checked in order."""
        recipients = envelope.recipients
        data = envelope.data
        group = [b"MAIL FROM:<", envelope.sender.encode("ascii"), b">"]
        if self.eight_bit and not data.isascii():
            group.append(b" BODY=8BITMIME")  # RFC 6152 section 3
        group.append(b"\r\n")
        for recipient in recipients:
            group += (b"RCPT TO:<", recipient.encode("ascii"), b">\r\n")
        group.append(b"DATA\r\n")
        count = len(recipients) + 2
        try:
            self.write(b"".join(group))
        except aiosmtplib.SMTPException as exc:
            return local_failure(exc, Stage.MAIL, Outcome.DEFERRED)
        got, error = await self.read(count)
        if not got:
            assert error is not None
            return local_failure(error, Stage.MAIL, Outcome.DEFERRED)
        # DATA answered 354 while we will not send the message (a refused MAIL, no
        # recipient left): the server waits for content. RFC 2920 section 3.1 warns that
        # servers differ here; closing the connection ends that transaction for sure.
        started_data = len(got) == count and got[-1][0] == _READY
        code, text = got[0]
        if code != _OK:
            if started_data:
                self.close()
            return self._refusal(code, text, Stage.MAIL, Outcome.DEFERRED)
        refused: list[tuple[str, SendResult]] = []
        for recipient, (code, text) in zip(recipients, got[1:count - 1], strict=False):
            if code in (_OK, _FORWARDED):
                continue
            result = self._refusal(code, text, Stage.RCPT, Outcome.DEFERRED)
            if result.code is None or result.code == _CLOSING:
                if started_data:
                    self.close()
                return result  # out of step, or 421 closing: the whole attempt is deferred
            refused.append((recipient, result))
        if error is not None:
            # Lost before every reply came; nothing of the message went out yet.
            stage = Stage.RCPT if len(got) < count - 1 else Stage.DATA
            return local_failure(error, stage, Outcome.DEFERRED)
        if len(refused) == len(recipients):
            if started_data:
                self.close()
            return all_refused(refused)
        code, text = got[-1]
        if code != _READY:
            return self._refusal(code, text, Stage.DATA, Outcome.DEFERRED)
        try:
            self.write(wire_data(data))
        except aiosmtplib.SMTPException as exc:
            return local_failure(exc, Stage.DATA, Outcome.UNKNOWN)
        got, error = await self.read(1)
        if error is not None:
            # RFC 5321 section 6.1: once the data is on the wire a lost reply does not
            # mean a lost message; the server may already hold it.
            return local_failure(error, Stage.DATA, Outcome.UNKNOWN)
        [(code, text)] = got
        if code != _OK:
            return self._refusal(code, text, Stage.DATA, Outcome.UNKNOWN)
        return SendResult(Outcome.SENT, code, text, None, tuple(refused))

    def _refusal(self, code: int, text: str, stage: Stage, unexpected: Outcome) -> SendResult:
        """A 4xx/5xx reply as :func:`reply` reads it; any other code puts us out of step."""
        if 400 <= code < 600:
            if code == _CLOSING:
                self.close()  # RFC 5321 section 3.8: the server is closing the channel
            return reply(code, text, stage)
        self.close()
        return SendResult(unexpected, None, f"unexpected reply {code}", stage)
