"""SmtpTransport against real in-process aiosmtpd relays, one per fault mode."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from mailer.config import Settings
from mailer.smtp.bridge import BlockingTransport
from mailer.smtp.pool import SmtpTransport
from mailer.smtp.replies import Outcome, SendResult, Stage
from tests.smtp_servers import Recorder, make_tls_contexts, refusing_port, running_smtp_server
from tests.smtp_servers import SimpleEnvelope as Envelope
from tests.smtp_servers import sample_envelope as message

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def send_with(transport: SmtpTransport, *envelopes: Envelope) -> list[SendResult]:
    try:
        return await transport.send_many(list(envelopes))
    finally:
        await transport.close()


# -- happy path and pooling -----------------------------------------------------------


def test_plain_send_arrives_byte_for_byte() -> None:
    # Given a well-behaved relay
    with running_smtp_server() as (host, port, relay):
        envelope = message(1)
        # When one message is sent
        [result] = run(send_with(SmtpTransport(host, port), envelope))
    # Then it is "sent" with the relay's 250 and arrives exactly as serialised
    assert result.outcome is Outcome.SENT
    assert result.code == 250 and result.stage is None
    [received] = relay.messages
    assert received.mail_from == "sender@example.com"
    assert received.rcpt_tos == ("rcpt@example.org",)
    assert received.data == envelope.data  # dot-stuffing undone by the relay, CRLF kept


def test_200_sends_over_a_pool_of_4_use_at_most_4_connections() -> None:
    # Given a relay and a pool of four connections
    with running_smtp_server() as (host, port, relay):
        envelopes = [message(n) for n in range(200)]
        # When 200 messages are sent at once
        results = run(send_with(SmtpTransport(host, port, pool_size=4), *envelopes))
        # Then every one is sent, in input order, over no more than four reused connections
        assert [r.outcome for r in results] == [Outcome.SENT] * 200
        assert 1 <= relay.connections <= 4
        assert sorted(m.data for m in relay.messages) == sorted(e.data for e in envelopes)


def test_connections_are_reopened_after_max_messages_per_connection() -> None:
    # Given a pool of one connection that may carry two transactions
    with running_smtp_server() as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1, max_messages_per_connection=2)
        # When five messages go out
        results = run(send_with(transport, *(message(n) for n in range(5))))
        # Then they needed three connections, and all arrived
        assert all(r.outcome is Outcome.SENT for r in results)
        assert relay.connections == 3
        assert len(relay.messages) == 5


# -- the SMTP fault matrix (reliability.md item 8) ----------------------------------


@pytest.mark.parametrize(
    ("fault", "outcome", "code", "enhanced", "user_unknown", "stage", "relay_has_it"),
    [
        ("4xx_rcpt", Outcome.DEFERRED, 451, "4.3.0", False, Stage.RCPT, False),
        ("5xx_rcpt_user_unknown", Outcome.FAILED, 550, "5.1.1", True, Stage.RCPT, False),
        ("5xx_policy", Outcome.FAILED, 550, "5.7.1", False, Stage.DATA, False),
        ("4xx_data", Outcome.DEFERRED, 451, "4.3.0", False, Stage.DATA, False),
        # The relay kept these: losing the reply after the final dot is never "failed".
        ("drop_after_data", Outcome.UNKNOWN, None, None, False, Stage.DATA, True),
        ("slow_after_data", Outcome.UNKNOWN, None, None, False, Stage.DATA, True),
    ],
)
def test_each_fault_maps_to_its_outcome(
    fault: str,
    outcome: Outcome,
    code: int | None,
    enhanced: str | None,
    user_unknown: bool,
    stage: Stage,
    relay_has_it: bool,
) -> None:
    # Given a relay with the fault and a client timeout shorter than the slow relay's stall
    with running_smtp_server(fault=fault) as (host, port, relay):
        transport = SmtpTransport(host, port, timeout=0.5)
        # When one message is sent
        [result] = run(send_with(transport, message()))
        # Then the outcome, code and stage say what happened and whether it may be retried
        assert result.outcome is outcome
        assert result.code == code
        assert result.enhanced == enhanced
        assert result.is_user_unknown is user_unknown
        assert result.stage is stage
        assert result.response  # the server's words, or a short local description
        assert (len(relay.messages) == 1) is relay_has_it


class GarblingRelay(Recorder):
    """Keeps the message, then answers the final dot with something that is not a reply."""

    garble = True

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        status = await super().handle_DATA(server, session, envelope)
        return "hello there" if self.garble else status


def test_an_unreadable_reply_after_the_data_is_unknown_and_the_connection_dropped() -> None:
    # Given a relay that keeps the message but answers with garbage
    with running_smtp_server(handler=GarblingRelay()) as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1)
        # When a message is sent, then the relay behaves again and another is sent
        async def scenario() -> list[SendResult]:
            try:
                first = await transport.send(message(1))
                relay.garble = False
                return [first, await transport.send(message(2))]
            finally:
                await transport.close()

        first, second = run(scenario())
        # Then the first is unknown (it may have been taken), and the out-of-step
        # connection was not reused for the second
        assert first.outcome is Outcome.UNKNOWN and first.code is None
        assert second.outcome is Outcome.SENT
        assert relay.connections == 2 and len(relay.messages) == 2


def test_connection_refused_is_deferred_without_a_code() -> None:
    # Given a port where nothing listens
    with refusing_port() as port:
        # When a message is sent there
        [result] = run(send_with(SmtpTransport("127.0.0.1", port), message()))
    # Then it is deferred (safe to retry) and says why
    assert result == SendResult(Outcome.DEFERRED, None, "connection refused", Stage.CONNECT)


def test_a_dead_relay_defers_a_whole_batch_without_raising() -> None:
    # Given a port where nothing listens
    with refusing_port() as port:
        # When a batch is sent there
        results = run(send_with(SmtpTransport("127.0.0.1", port, pool_size=2),
                                *(message(n) for n in range(20))))
    # Then every message is deferred rather than an exception escaping
    assert {r.outcome for r in results} == {Outcome.DEFERRED}


def test_partial_rcpt_refusal_reports_each_refused_recipient() -> None:
    # Given a relay that does not know one of two recipients
    with running_smtp_server(fault="partial_rcpt") as (host, port, relay):
        envelope = Envelope("s@example.com", ("known@example.org", "unknown@example.org"),
                            message().data)
        # When the message is sent to both
        [result] = run(send_with(SmtpTransport(host, port), envelope))
        # Then it went to the known one, and the refused one carries its own 5.1.1 result
        assert result.outcome is Outcome.SENT
        [(address, refusal)] = result.refused
        assert address == "unknown@example.org"
        assert refusal.outcome is Outcome.FAILED and refusal.is_user_unknown
        [received] = relay.messages
        assert received.rcpt_tos == ("known@example.org",)
        assert "unknown@example.org" not in repr(result)  # results may be logged


def test_all_recipients_refused_fails_with_every_refusal_listed() -> None:
    # Given a relay that knows no recipient
    with running_smtp_server(fault="5xx_rcpt_user_unknown") as (host, port, relay):
        envelope = Envelope("s@example.com", ("a@example.org", "b@example.org"), b"x\r\n")
        # When the message is sent to two of them
        [result] = run(send_with(SmtpTransport(host, port), envelope))
        # Then it failed at RCPT, with both refusals, and no DATA was sent
        assert result.outcome is Outcome.FAILED and result.stage is Stage.RCPT
        assert [address for address, _ in result.refused] == ["a@example.org", "b@example.org"]
        assert relay.messages == []


# -- connection reuse after trouble ----------------------------------------------------


def test_a_connection_that_failed_is_replaced_and_the_next_send_succeeds() -> None:
    # Given a one-connection pool and a relay that drops the line after the first DATA
    with running_smtp_server(fault="drop_after_data") as (host, port, relay):

        async def scenario() -> tuple[SendResult, SendResult]:
            transport = SmtpTransport(host, port, pool_size=1)
            try:
                first = await transport.send(message(1))
                relay.fault = None
                second = await transport.send(message(2))
                return first, second
            finally:
                await transport.close()

        # When two messages are sent one after the other
        first, second = run(scenario())
        # Then the first is unknown, the second goes out on a fresh connection
        assert first.outcome is Outcome.UNKNOWN
        assert second.outcome is Outcome.SENT
        assert relay.connections == 2


def test_a_refused_transaction_is_reset_and_the_connection_reused() -> None:
    # Given a one-connection pool and a relay refusing recipients
    with running_smtp_server(fault="5xx_rcpt_user_unknown") as (host, port, relay):

        async def scenario() -> list[SendResult]:
            transport = SmtpTransport(host, port, pool_size=1)
            try:
                results = [await transport.send(message(1)), await transport.send(message(2))]
                relay.fault = None
                results.append(await transport.send(message(3)))
                return results
            finally:
                await transport.close()

        # When two sends are refused and a third is accepted
        results = run(scenario())
        # Then each refusal was cleared with RSET and one connection carried all three
        assert [r.outcome for r in results] == [Outcome.FAILED, Outcome.FAILED, Outcome.SENT]
        assert relay.rsets == 2
        assert relay.connections == 1


def test_a_pooled_connection_the_server_closed_is_replaced_transparently() -> None:
    # Given a pooled connection that the relay has since closed (as an idle timeout does)
    with running_smtp_server() as (host, port, relay):

        async def scenario() -> list[SendResult]:
            transport = SmtpTransport(host, port, pool_size=1)
            try:
                first = await transport.send(message(1))
                relay.drop_connections()
                return [first, await transport.send(message(2))]
            finally:
                await transport.close()

        # When the next message is sent
        results = run(scenario())
        # Then it still goes out, on a new connection, and nothing is duplicated
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
        assert relay.connections == 2
        assert len(relay.messages) == 2


def test_idle_connections_are_checked_with_noop_before_reuse() -> None:
    # Given a pool that NOOP-checks any connection idle longer than zero seconds
    with running_smtp_server() as (host, port, relay):
        transport = SmtpTransport(host, port, pool_size=1, idle_check_after=0.0)
        # When two messages go out one after the other
        results: list[SendResult] = []

        async def scenario() -> None:
            try:
                results.append(await transport.send(message(1)))
                results.append(await transport.send(message(2)))
            finally:
                await transport.close()

        run(scenario())
        # Then the reused connection was checked first
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
        assert relay.noops == 1 and relay.connections == 1


# -- envelope hygiene ----------------------------------------------------------------


@pytest.mark.parametrize(
    "recipient",
    [
        "b@example.com>\r\nRCPT TO:<c@example.com",  # command smuggling via the address
        "b@example.com> NOTIFY=NEVER",               # ESMTP parameter smuggling
        "Bob <b@example.com>",                        # a display name, not a mailbox
        "bö@example.com",                             # would need SMTPUTF8
        "",
    ],
)
def test_an_address_unfit_for_the_smtp_command_line_is_failed_locally(recipient: str) -> None:
    # Given a relay
    with running_smtp_server() as (host, port, relay):
        # When the envelope names an address that cannot go on a RCPT line as it is
        [result] = run(send_with(SmtpTransport(host, port),
                                 Envelope("s@example.com", (recipient,), b"x\r\n")))
        # Then nothing reaches the relay, and the failure names no address
        assert result.outcome is Outcome.FAILED and result.stage is Stage.ENVELOPE
        assert "example.com" not in result.response
        assert relay.connections == 0


def test_smtp_smuggling_bodies_arrive_as_one_message() -> None:
    # Given a body with bare-LF end-of-data lookalikes and a smuggled command after them
    data = b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@example.net>\r\n.\r\nend\r\n"
    with running_smtp_server() as (host, port, relay):
        # When it is sent
        envelope = Envelope("s@x.example", ("r@x.example",), data)
        [result] = run(send_with(SmtpTransport(host, port), envelope))
        # Then exactly one message arrives, still carrying the smuggled text as body lines
        assert result.outcome is Outcome.SENT
        [received] = relay.messages
        assert received.data.endswith(b"\r\nMAIL FROM:<evil@example.net>\r\n.\r\nend\r\n")


# -- TLS ------------------------------------------------------------------------------


def test_implicit_tls_and_required_starttls_both_deliver() -> None:
    server_ctx, client_ctx = make_tls_contexts()
    # Given a relay speaking TLS from the first byte, and one requiring STARTTLS
    with running_smtp_server(tls_context=server_ctx, implicit_tls=True) as (host, port, relay):
        # When each is used with the matching security mode
        [result] = run(send_with(
            SmtpTransport(host, port, security="tls", tls_context=client_ctx), message()))
        # Then the message arrives
        assert result.outcome is Outcome.SENT and len(relay.messages) == 1
    with running_smtp_server(tls_context=server_ctx) as (host, port, relay):
        [result] = run(send_with(
            SmtpTransport(host, port, security="starttls", tls_context=client_ctx), message()))
        assert result.outcome is Outcome.SENT and len(relay.messages) == 1


def test_required_starttls_never_falls_back_to_plaintext() -> None:
    # Given a relay that does not offer STARTTLS
    with running_smtp_server() as (host, port, relay):
        # When STARTTLS is required
        [result] = run(send_with(SmtpTransport(host, port, security="starttls"), message()))
        # Then the message is deferred and nothing was sent in the clear
        assert result.outcome is Outcome.DEFERRED and result.stage is Stage.CONNECT
        assert relay.messages == []


def test_an_untrusted_certificate_is_deferred() -> None:
    server_ctx, _ = make_tls_contexts()
    # Given an implicit-TLS relay whose certificate our default trust store does not know
    with running_smtp_server(tls_context=server_ctx, implicit_tls=True) as (host, port, relay):
        # When we connect with the default (verifying) TLS settings
        [result] = run(send_with(SmtpTransport(host, port, security="tls"), message()))
        # Then the attempt is deferred as a TLS failure
        assert result.outcome is Outcome.DEFERRED and result.stage is Stage.CONNECT
        assert result.relay_error and result.code is None
        # And the stored reason names the certificate problem, not just "TLS failed"
        assert result.response.startswith("TLS certificate not trusted: ")
        assert "self-signed certificate" in result.response or "issuer" in result.response
        assert relay.messages == []


# -- the synchronous façade ------------------------------------------------------------


def test_blocking_transport_serves_several_threads_over_one_pool() -> None:
    # Given one BlockingTransport shared by four worker threads
    with running_smtp_server() as (host, port, relay):
        blocking = BlockingTransport(lambda: SmtpTransport(host, port, pool_size=3))
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def worker(offset: int) -> None:
            results = blocking.send_many([message(offset + n) for n in range(25)])
            with lock:
                outcomes.extend(r.outcome for r in results)

        threads = [threading.Thread(target=worker, args=(100 * i,)) for i in range(4)]
        # When each thread sends 25 messages
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        single = blocking.send(message(999))
        blocking.close()
        # Then all 101 are sent over at most three connections, and a closed façade refuses work
        assert outcomes == [Outcome.SENT] * 100 and single.outcome is Outcome.SENT
        assert len(relay.messages) == 101
        assert relay.connections <= 3
        with pytest.raises(RuntimeError):
            blocking.send_many([message()])


# -- pure parts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "response", "enhanced", "user_unknown"),
    [
        (550, "5.1.1 <x@example.org>: Recipient address rejected", "5.1.1", True),
        (550, "5.1.10 Recipient address rejected: null MX", "5.1.10", True),
        (553, "5.1.0 Address rejected", "5.1.0", True),
        (550, "5.7.1 Relaying denied", "5.7.1", False),      # policy, not a missing user
        (553, "5.1.8 Bad sender's system address", "5.1.8", False),  # about our sender
        (550, "Mailbox unavailable", None, False),           # no enhanced code: not sure
        (451, "4.1.1 Try later", "4.1.1", False),            # temporary
        (250, "2.0.0 Ok: queued as 4ABC", "2.0.0", False),
        (550, "Requested action not taken 5.1.1", None, False),  # must lead the text
    ],
)
def test_enhanced_status_codes_are_read_from_the_front_of_the_reply(
    code: int, response: str, enhanced: str | None, user_unknown: bool
) -> None:
    outcome = Outcome.FAILED if code >= 500 else Outcome.DEFERRED if code >= 400 else Outcome.SENT
    result = SendResult(outcome, code, response, Stage.RCPT)
    assert result.enhanced == enhanced
    assert result.is_user_unknown is user_unknown


def test_a_refused_sender_is_never_a_user_unknown() -> None:
    result = SendResult(Outcome.FAILED, 550, "5.1.0 Sender address rejected", Stage.MAIL)
    assert not result.is_user_unknown


def test_responses_are_truncated_to_500_characters() -> None:
    assert len(SendResult(Outcome.FAILED, 554, "x" * 2000).response) == 500


def test_from_settings_uses_the_smtp_variables() -> None:
    settings = Settings(smtp_host="127.0.0.1", smtp_port=2525, smtp_security="tls",
                        smtp_pool_size=3, smtp_timeout=7.0, smtp_username="u")
    transport = SmtpTransport.from_settings(settings)
    assert (transport.host, transport.port, transport.security) == ("127.0.0.1", 2525, "tls")
    assert (transport.pool_size, transport.timeout) == (3, 7.0)
