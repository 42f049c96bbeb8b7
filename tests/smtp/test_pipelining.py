"""RFC 2920 pipelining in SmtpTransport, against real aiosmtpd relays and a real Postfix.

aiosmtpd reads commands one line at a time from its stream, so pipelined input is safe
with it, but it does not offer PIPELINING; :class:`PipeliningRelay` says it does. What
went on the wire is seen by recording :meth:`Link.write`: one write for MAIL, RCPT and
DATA together, one for the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.smtp.pipelining import Link, wire_data
from mailer.smtp.pool import SmtpTransport
from mailer.smtp.replies import Outcome, SendResult, Stage
from mailer.smtp.sink import FastSink
from tests.relays import PostfixRelay, running_postfix
from tests.smtp_servers import (
    Recorder,
    _EphemeralController,
    make_tls_contexts,
    running_smtp_server,
)
from tests.smtp_servers import SimpleEnvelope as Envelope
from tests.smtp_servers import sample_envelope as message

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def send_all(transport: SmtpTransport, *envelopes: Envelope) -> list[SendResult]:
    """Send one after the other on the pool, then close it."""
    try:
        return [await transport.send(envelope) for envelope in envelopes]
    finally:
        await transport.close()


async def fault_then_clear(transport: SmtpTransport, relay: Recorder) -> list[SendResult]:
    """Send one message into the relay's fault, clear the fault, send another; then close."""
    try:
        first = await transport.send(message(1))
        relay.fault = None
        return [first, await transport.send(message(2))]
    finally:
        await transport.close()


class PipeliningRelay(Recorder):
    """A Recorder whose EHLO reply offers PIPELINING, with MAIL and DATA faults of its own."""

    def __init__(self, fault: str | None = None, *, mail_reply: str | None = None,
                 data_command: str | None = None, **kwargs: Any) -> None:
        super().__init__(fault, **kwargs)
        self.mail_reply = mail_reply  # answer MAIL with this instead of 250
        self.drop_at_mail = False  # close the connection on MAIL, before any reply
        #: What ScriptedSMTP does with the DATA command: None (as aiosmtpd does), "drop"
        #: (close before the 354), "354" (start data even without recipients), or a reply.
        self.data_command = data_command

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        """aiosmtpd's EHLO reply plus PIPELINING, before its last line."""
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """Take the sender, unless a MAIL fault says otherwise."""
        if self.drop_at_mail:
            server.transport.close()
            return "250 OK"  # never heard: the connection is gone
        if self.mail_reply is not None:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"


class ScriptedSMTP(AiosmtpdSMTP):
    """aiosmtpd's server, with the DATA command answered as the handler's data_command says."""

    async def smtp_DATA(self, arg: str) -> None:
        """Refuse, drop, or (for a broken server) start data without recipients."""
        mode = getattr(self.event_handler, "data_command", None)
        if mode == "drop":
            self.transport.close()
        elif mode == "354":
            await self.push("354 End data with <CR><LF>.<CR><LF>")
        elif mode is not None:
            await self.push(mode)
        else:
            await super().smtp_DATA(arg)


class _ScriptedController(_EphemeralController):
    def factory(self) -> AiosmtpdSMTP:
        return ScriptedSMTP(self.handler, **self.SMTP_kwargs)


@contextlib.contextmanager
def pipelining_relay(
    relay: PipeliningRelay | None = None, **options: Any,
) -> Iterator[tuple[str, int, Any]]:
    """A real aiosmtpd on 127.0.0.1 that offers PIPELINING; yields (host, port, handler).

    ``options`` go to aiosmtpd's controller (``ssl_context`` for implicit TLS, or
    ``tls_context`` with ``require_starttls``).
    """
    handler = relay or PipeliningRelay()
    controller = _ScriptedController(handler, hostname="127.0.0.1", port=0,
                                     server_hostname="pipelining-relay", enable_SMTPUTF8=False,
                                     **options)
    controller.start()
    try:
        yield "127.0.0.1", controller.port, handler
    finally:
        controller.stop()


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write a Link makes, in order."""
    writes: list[bytes] = []
    original = Link.write

    def record(self: Link, data: bytes) -> None:
        writes.append(data)
        original(self, data)

    monkeypatch.setattr(Link, "write", record)
    return writes


# -- what goes on the wire -------------------------------------------------------------


def test_mail_rcpt_and_data_go_out_in_one_write_and_the_message_in_the_next(
    wire: list[bytes],
) -> None:
    # Given a relay that offers PIPELINING
    with pipelining_relay() as (host, port, relay):
        envelope = Envelope("sender@example.com", ("a@example.org", "b@example.org"),
                            message(1).data)
        # When one message to two recipients is sent
        [result] = run(send_all(SmtpTransport(host, port), envelope))
        # Then it is sent, and arrived byte for byte (dot-stuffing undone by the relay)
        assert result.outcome is Outcome.SENT and result.code == 250 and result.stage is None
        [received] = relay.messages
        assert received.rcpt_tos == ("a@example.org", "b@example.org")
        assert received.data == envelope.data
    # And the commands went out as one group, then the stuffed message with its final dot
    assert wire[0] == (b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<a@example.org>\r\n"
                       b"RCPT TO:<b@example.org>\r\nDATA\r\n")
    assert b"\r\n..leading dot\r\n" in wire[1] and wire[1].endswith(b"\r\n.\r\n")
    assert wire[2:] == [b"QUIT\r\n"]  # when the pool closed


def test_a_pool_reuses_pipelined_connections_for_many_messages(wire: list[bytes]) -> None:
    # Given a relay that offers PIPELINING and a pool of three connections
    with pipelining_relay() as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=3)
        envelopes = [message(n) for n in range(60)]

        async def scenario() -> list[SendResult]:
            try:
                return await transport.send_many(envelopes)
            finally:
                await transport.close()

        # When 60 messages are sent at once
        results = run(scenario())
        # Then all are sent over at most three connections, two writes each, QUIT at the end
        assert [r.outcome for r in results] == [Outcome.SENT] * 60
        assert sorted(m.data for m in relay.messages) == sorted(e.data for e in envelopes)
        assert relay.connections <= 3
    assert len([w for w in wire if w.startswith(b"MAIL FROM:")]) == 60
    assert len([w for w in wire if w == b"QUIT\r\n"]) == relay.connections


def test_a_non_ascii_body_asks_for_8bitmime(wire: list[bytes]) -> None:
    # Given a relay offering PIPELINING and 8BITMIME, and a message with raw UTF-8
    with pipelining_relay() as (host, port, relay):
        data = "Subject: x\r\n\r\nGrüße\r\n".encode()
        [result] = run(send_all(SmtpTransport(host, port),
                                Envelope("s@example.com", ("r@example.org",), data)))
        # Then MAIL carries BODY=8BITMIME (RFC 6152) and the bytes arrive unchanged
        assert result.outcome is Outcome.SENT
        assert relay.messages[0].data == data
    assert wire[0].startswith(b"MAIL FROM:<s@example.com> BODY=8BITMIME\r\n")


# -- every stage's outcome, as the step-by-step path reports it -------------------------


def test_a_refused_rcpt_is_a_refusal_of_that_recipient_with_its_code() -> None:
    # Given a relay that does not know the recipient (550 5.1.1 at RCPT)
    with pipelining_relay(PipeliningRelay("5xx_rcpt_user_unknown")) as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1)

        # When a message is sent, and then another once the relay knows the recipient
        first, second = run(fault_then_clear(transport, relay))
        # Then the first failed at RCPT as a user-unknown with the relay's code and text
        assert first.outcome is Outcome.FAILED and first.stage is Stage.RCPT
        assert (first.code, first.enhanced, first.is_user_unknown) == (550, "5.1.1", True)
        [(address, refusal)] = first.refused
        assert address == "rcpt@example.org" and refusal.code == 550
        # And nothing was delivered for it; the connection was reset and reused
        assert second.outcome is Outcome.SENT
        assert len(relay.messages) == 1 and relay.rsets == 1 and relay.connections == 1


def test_one_refused_recipient_among_several_is_reported_and_the_rest_get_it() -> None:
    with pipelining_relay(PipeliningRelay("partial_rcpt")) as (host, port, relay):
        envelope = Envelope("s@example.com", ("known@example.org", "unknown@example.org",
                                              "also@example.org"), message().data)
        [result] = run(send_all(SmtpTransport(host, port), envelope))
        assert result.outcome is Outcome.SENT
        [(address, refusal)] = result.refused
        assert address == "unknown@example.org" and refusal.is_user_unknown
        assert relay.messages[0].rcpt_tos == ("known@example.org", "also@example.org")


def test_a_temporary_rcpt_refusal_is_deferred() -> None:
    with pipelining_relay(PipeliningRelay("4xx_rcpt")) as (host, port, relay):
        [result] = run(send_all(SmtpTransport(host, port), message()))
        assert (result.outcome, result.code, result.stage) == (Outcome.DEFERRED, 451, Stage.RCPT)
        assert relay.messages == []


def test_421_at_rcpt_defers_and_the_connection_is_not_reused() -> None:
    relay = PipeliningRelay()

    async def closing(server: Any, session: Any, envelope: Any, address: str,
                      options: list[str]) -> str:
        return "421 4.7.0 Too many connections, closing"

    relay.handle_RCPT = closing  # type: ignore[method-assign]
    with pipelining_relay(relay) as (host, port, _):
        transport = SmtpTransport(host, port, pool_size=1)
        first, second = run(send_all(transport, message(1), message(2)))
        assert (first.outcome, first.code, first.stage) == (Outcome.DEFERRED, 421, Stage.RCPT)
        assert second.outcome is Outcome.DEFERRED
        assert relay.connections == 2  # the closing connection was not used again


@pytest.mark.parametrize(
    ("reply", "outcome", "relay_error"),
    [
        # A relay that will not relay for us: our problem, never the recipient's (SPEC 5).
        ("554 5.7.1 <s@example.com>: Relay access denied", Outcome.DEFERRED, True),
        ("530 5.7.0 Authentication required", Outcome.DEFERRED, True),
        ("553 5.1.8 Sender address rejected: domain not found", Outcome.FAILED, False),
        ("451 4.3.0 Try again later", Outcome.DEFERRED, False),
    ],
)
def test_a_refused_mail_is_a_sender_or_relay_refusal(
    reply: str, outcome: Outcome, relay_error: bool,
) -> None:
    # Given a relay that refuses MAIL FROM (and so answers RCPT and DATA with 503)
    with pipelining_relay(PipeliningRelay(mail_reply=reply)) as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1)
        # When a message is sent twice
        first, second = run(send_all(transport, message(1), message(2)))
        # Then each attempt ended at MAIL with the relay's reply, never as a user-unknown
        for result in (first, second):
            assert result.outcome is outcome and result.stage is Stage.MAIL
            assert result.code == int(reply[:3]) and result.relay_error is relay_error
            assert not result.is_user_unknown and result.refused == ()
        # And the 503s to the pipelined RCPT and DATA did not throw the session out of step
        assert relay.messages == [] and relay.connections == 1


@pytest.mark.parametrize(
    ("fault", "data_command", "outcome", "code"),
    [
        # Refused after the message: about the message itself.
        ("5xx_policy", None, Outcome.FAILED, 550),
        ("4xx_data", None, Outcome.DEFERRED, 451),
        # Refused at the DATA command, before any of the message went out.
        (None, "451 4.3.2 System not accepting network messages", Outcome.DEFERRED, 451),
        (None, "554 5.5.1 Error: no valid recipients", Outcome.FAILED, 554),
    ],
)
def test_a_refused_data_is_reported_at_data(
    fault: str | None, data_command: str | None, outcome: Outcome, code: int,
) -> None:
    relay = PipeliningRelay(fault, data_command=data_command)
    with pipelining_relay(relay) as (host, port, _):
        transport = SmtpTransport(host, port, pool_size=1)
        first, second = run(send_all(transport, message(1), message(2)))
        assert (first.outcome, first.code, first.stage) == (outcome, code, Stage.DATA)
        assert second.outcome is outcome  # the connection stayed in step for the next one
        assert relay.messages == [] and relay.connections == 1


@pytest.mark.parametrize("fault", ["drop_after_data", "slow_after_data"])
def test_a_reply_lost_after_the_message_went_out_is_unknown(fault: str) -> None:
    # Given a relay that keeps the message, then drops the line (or stalls past our timeout)
    with pipelining_relay(PipeliningRelay(fault, slow_seconds=5.0)) as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1, timeout=0.5)

        # When a message is sent, and then another
        first, second = run(fault_then_clear(transport, relay))
        # Then the first is unknown (the relay may have it: it does), never failed
        assert (first.outcome, first.code, first.stage) == (Outcome.UNKNOWN, None, Stage.DATA)
        assert first.response in ("connection lost", "timed out waiting for the server")
        # And the next one goes out on a fresh connection
        assert second.outcome is Outcome.SENT
        assert relay.connections == 2 and len(relay.messages) == 2


@pytest.mark.parametrize(("where", "stage"), [("mail", Stage.MAIL), ("data", Stage.DATA)])
def test_a_connection_lost_before_the_message_went_out_is_deferred(
    where: str, stage: Stage,
) -> None:
    # Given a relay that drops the line at MAIL, or at the DATA command (before its 354)
    relay = PipeliningRelay(data_command="drop" if where == "data" else None)
    relay.drop_at_mail = where == "mail"
    with pipelining_relay(relay) as (host, port, _):
        # When a message is sent
        [result] = run(send_all(SmtpTransport(host, port), message()))
        # Then it is deferred: nothing of the message left us, so a retry cannot duplicate it
        assert (result.outcome, result.code, result.stage) == (Outcome.DEFERRED, None, stage)
        assert relay.messages == []


def test_a_broken_server_that_starts_data_without_recipients_gets_no_message() -> None:
    # Given a relay that refuses every recipient but still answers DATA with 354
    # (RFC 2920 section 3.1 names such servers), and a one-connection pool
    relay = PipeliningRelay("5xx_rcpt_user_unknown", data_command="354")
    with pipelining_relay(relay) as (host, port, _):
        transport = SmtpTransport(host, port, pool_size=1)
        first, second = run(send_all(transport, message(1), message(2)))
        # Then each is a refusal at RCPT, and no connection carried a message body after a
        # 354 with no recipient: it was closed instead
        assert first.outcome is Outcome.FAILED and first.stage is Stage.RCPT
        assert second.outcome is Outcome.FAILED
        assert relay.messages == [] and relay.connections == 2


def test_an_idle_connection_the_server_closed_is_replaced(wire: list[bytes]) -> None:
    with pipelining_relay() as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1)

        async def scenario() -> list[SendResult]:
            try:
                first = await transport.send(message(1))
                relay.drop_connections()
                await asyncio.sleep(0.2)  # the close reaches us while the connection idles
                return [first, await transport.send(message(2))]
            finally:
                await transport.close()

        assert [r.outcome for r in run(scenario())] == [Outcome.SENT, Outcome.SENT]
        assert relay.connections == 2 and len(relay.messages) == 2


def test_idle_connections_are_checked_with_noop_on_a_pipelined_link() -> None:
    with pipelining_relay() as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1, idle_check_after=0.0)
        results = run(send_all(transport, message(1), message(2)))
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
        assert relay.noops == 1 and relay.connections == 1


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_pipelining_works_over_tls(mode: str, wire: list[bytes]) -> None:
    # Given a relay speaking TLS from the first byte, or requiring STARTTLS first
    server_ctx, client_ctx = make_tls_contexts()
    options: dict[str, Any] = (
        {"ssl_context": server_ctx} if mode == "tls"
        else {"tls_context": server_ctx, "require_starttls": True}
    )
    with pipelining_relay(**options) as (host, port, relay):
        transport = SmtpTransport(host, port, security=mode, tls_context=client_ctx)
        # When two messages go out over it
        results = run(send_all(transport, message(1), message(2)))
        # Then both arrive, pipelined inside the TLS session
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
        assert len(relay.messages) == 2
        # One connection: after STARTTLS the client greets again (RFC 3207 section 4.2),
        # which aiosmtpd counts as a second session
        assert relay.connections == (1 if mode == "tls" else 2)
    assert len([w for w in wire if w.startswith(b"MAIL FROM:")]) == 2


def test_replies_dribbling_in_a_byte_at_a_time_are_read_in_order() -> None:
    # Given a server that offers PIPELINING and sends every reply one byte per write, with
    # multi-line replies to EHLO, MAIL and the final dot
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def say(text: bytes) -> None:
            for byte in text:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)

        await say(b"220 dribble ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                await say(b"250-dribble\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                await say(b"250-sender\r\n250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                refused = b"unknown" in line
                await say(b"550 5.1.1 no such user\r\n" if refused else b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                await say(b"354 go ahead\r\n")
                received.append(await reader.readuntil(b"\r\n.\r\n"))
                await say(b"250-2.0.0 queued\r\n250 2.0.0 as 1\r\n")
            elif verb == b"QUIT":
                await say(b"221 bye\r\n")
                break
            else:
                await say(b"250 ok\r\n")
        writer.close()

    async def scenario() -> list[SendResult]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        envelope = Envelope("s@example.com", ("a@example.org", "unknown@example.org"),
                            message(1).data)
        try:
            return await send_all(SmtpTransport("127.0.0.1", port, pool_size=1),
                                  envelope, message(2))
        finally:
            server.close()

    first, second = run(scenario())
    # Then each reply was matched to its command: the multi-line final reply, the refusal
    assert first.outcome is Outcome.SENT and first.response == "2.0.0 queued\n2.0.0 as 1"
    [(address, refusal)] = first.refused
    assert address == "unknown@example.org" and refusal.is_user_unknown
    assert second.outcome is Outcome.SENT
    assert len(received) == 2


# -- when not to pipeline ----------------------------------------------------------------


def test_a_server_without_pipelining_gets_one_command_at_a_time(wire: list[bytes]) -> None:
    # Given plain aiosmtpd, which does not offer PIPELINING
    with running_smtp_server(fault="5xx_rcpt_user_unknown") as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1)

        first, second = run(fault_then_clear(transport, relay))
        # Then the step-by-step path ran (no Link) with the same outcomes
        assert first.outcome is Outcome.FAILED and first.is_user_unknown
        assert second.outcome is Outcome.SENT and len(relay.messages) == 1
    assert wire == []


def test_pipelining_can_be_turned_off(wire: list[bytes]) -> None:
    with pipelining_relay() as (host, port, relay):
        [result] = run(send_all(SmtpTransport(host, port, pipelining=False), message()))
        assert result.outcome is Outcome.SENT and len(relay.messages) == 1
    assert wire == []


# -- the project's fast sink answers a whole group in one write -------------------------


def test_replies_arriving_in_one_burst_are_read_in_order(tmp_path: Path) -> None:
    # Given the fast sink, which answers MAIL, RCPT and DATA in a single write
    async def scenario() -> list[SendResult]:
        sink = FastSink(tmp_path)
        server = await sink.start("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = SmtpTransport("127.0.0.1", port, pool_size=2)
        try:
            return await transport.send_many([message(n) for n in range(20)])
        finally:
            await transport.close()
            server.close()

    results = run(scenario())
    # Then every message is sent and stored exactly
    assert [r.outcome for r in results] == [Outcome.SENT] * 20
    stored = sorted(p.read_bytes() for p in tmp_path.glob("*.eml"))
    assert stored == sorted(message(n).data for n in range(20))


# -- the DATA bytes ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" ", b"\r\n.\r\n",
                                 b"\n.\n", b"\r.\r"]), max_size=20).map(b"".join))
def test_wire_data_is_what_aiosmtplib_would_send(data: bytes) -> None:
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    assert wire_data(data) == expected


# -- a real Postfix (offers PIPELINING) --------------------------------------------------


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixRelay]:
    with running_postfix(tls=True) as relay:
        yield relay


def _postfix_transport(relay: PostfixRelay, helo: str) -> SmtpTransport:
    return SmtpTransport(relay.host, relay.port, security="starttls",
                         tls_context=relay.client_context(), local_hostname=helo, pool_size=2)


def test_postfix_takes_pipelined_messages_and_refuses_a_bad_recipient_at_rcpt(
    postfix: PostfixRelay, wire: list[bytes],
) -> None:
    before = len(postfix.delivered)
    tag = threading.get_ident()
    good = Envelope("sender@example.com", ("rcpt@example.org",),
                    f"Subject: pipelined {tag}\r\n\r\nBody\r\n.dot\r\n".encode())
    # Given a bad recipient next to a good one (Postfix: 501 5.1.3 bad address syntax)
    mixed = Envelope("sender@example.com", ("other@example.org", "bad@[300.0.0.1]"),
                     f"Subject: mixed {tag}\r\n\r\nBody\r\n".encode())
    # When both go out over STARTTLS with an FQDN greeting
    results = run(send_all(_postfix_transport(postfix, "mail.example.com"), good, mixed))
    # Then both are sent, the bad recipient refused at RCPT with Postfix's own code
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
    assert "queued as" in results[0].response
    [(address, refusal)] = results[1].refused
    assert address == "bad@[300.0.0.1]"
    assert refusal.outcome is Outcome.FAILED and refusal.code is not None
    assert refusal.code // 100 == 5 and refusal.stage is Stage.RCPT
    # And the commands were pipelined: one group write per message
    groups = [w for w in wire if w.startswith(b"MAIL FROM:")]
    assert len(groups) == 2 and all(g.endswith(b"DATA\r\n") for g in groups)
    # And Postfix relayed both to its sink
    delivered = postfix.wait_delivered(before + 2)
    assert any(f"pipelined {tag}".encode() in m.data and b"\r\n.dot\r\n" in m.data
               for m in delivered)


def test_postfix_refusing_our_greeting_at_rcpt_is_a_relay_error(postfix: PostfixRelay) -> None:
    # Given a client that greets Postfix with a name that is not fully qualified
    [result] = run(send_all(_postfix_transport(postfix, "client"), message()))
    # Then Postfix refuses it at RCPT (504 5.5.2), answers the pipelined DATA with 554, and
    # the attempt is deferred as the relay refusing us, not failed for the recipient
    assert (result.outcome, result.code, result.stage) == (Outcome.DEFERRED, 504, Stage.RCPT)
    assert result.relay_error and not result.is_user_unknown
    assert re.match(r"5\.5\.2\b", result.response)
