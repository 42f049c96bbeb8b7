"""Smoke tests of the real Postfix relay harness (tests/relays.py) with plain aiosmtplib."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator

import aiosmtplib
import pytest

from tests import relays
from tests.relays import PostfixRelay, pid_running, running_postfix


def _message(tag: str) -> bytes:
    return (
        f"From: sender@example.com\r\nTo: rcpt@example.org\r\nSubject: relay smoke {tag}\r\n"
        f"Message-ID: <{tag}@example.com>\r\n\r\nHello through Postfix {tag}\r\n"
    ).encode("ascii")


def _client(relay: PostfixRelay, helo: str) -> aiosmtplib.SMTP:
    # STARTTLS required of the client (no plaintext fallback), trusting only the test CA.
    return aiosmtplib.SMTP(
        hostname=relay.host, port=relay.port, local_hostname=helo, timeout=10,
        start_tls=True, tls_context=relay.client_context(),
    )


@pytest.fixture(scope="module")
def tls_relay() -> Iterator[PostfixRelay]:
    """Postfix offering STARTTLS with a certificate from a private CA; no AUTH."""
    with running_postfix(tls=True) as relay:
        yield relay


@pytest.fixture(scope="module")
def auth_relay() -> Iterator[PostfixRelay]:
    """Postfix requiring STARTTLS and SMTP AUTH (Dovecot) before it relays."""
    with running_postfix(require_tls=True, auth=True) as relay:
        yield relay


def test_mail_sent_over_starttls_with_an_fqdn_ehlo_reaches_the_sink(
    tls_relay: PostfixRelay,
) -> None:
    # Given the relay, and a client greeting as mail.example.com over verified STARTTLS
    tag = uuid.uuid4().hex[:12]
    before = len(tls_relay.delivered)

    async def send() -> tuple[int, str]:
        async with _client(tls_relay, "mail.example.com") as smtp:
            assert smtp.is_connected and smtp.get_transport_info("sslcontext") is not None
            errors, reply = await smtp.sendmail("sender@example.com", ["rcpt@example.org"],
                                                _message(tag))
            assert errors == {}
            return 250, reply

    # When one message is sent
    _, reply = asyncio.run(send())
    # Then Postfix queued it and relayed it on to the sink, received over TLS from our name
    assert "queued as" in reply
    delivered = tls_relay.wait_delivered(before + 1)
    [message] = [m for m in delivered if tag.encode() in m.data]
    assert message.mail_from == "sender@example.com"
    assert message.rcpt_tos == ("rcpt@example.org",)
    assert b"from mail.example.com" in message.data
    assert b"with ESMTPS" in message.data  # Postfix's Received: says it came over TLS


def test_ehlo_localhost_is_refused_with_504_5_5_2_at_rcpt(tls_relay: PostfixRelay) -> None:
    # Given the relay and a client that greets as "localhost"
    before = len(tls_relay.delivered)

    async def attempt() -> aiosmtplib.SMTPRecipientRefused:
        async with _client(tls_relay, "localhost") as smtp:
            await smtp.mail("sender@example.com")  # MAIL is still accepted ...
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await smtp.rcpt("rcpt@example.org")  # ... the HELO check fires at RCPT
            return refused.value

    # When it tries to send
    refusal = asyncio.run(attempt())
    # Then RCPT is refused with 504 5.5.2 naming the bad HELO, and nothing was delivered
    assert refusal.code == 504
    assert refusal.message.startswith("5.5.2 <localhost>: Helo command rejected")
    assert len(tls_relay.delivered) == before
    assert "Helo command rejected" in tls_relay.log_text()


def test_sasl_good_credentials_relay_and_wrong_ones_get_535(auth_relay: PostfixRelay) -> None:
    # Given a relay that requires STARTTLS and AUTH, and its one user
    tag = uuid.uuid4().hex[:12]
    before = len(auth_relay.delivered)

    async def wrong_password() -> aiosmtplib.SMTPAuthenticationError:
        async with _client(auth_relay, "mail.example.com") as smtp:
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
                await smtp.login(auth_relay.username, auth_relay.password + "-wrong")
            return failed.value

    async def good_password() -> int:
        async with _client(auth_relay, "mail.example.com") as smtp:
            response = await smtp.login(auth_relay.username, auth_relay.password)
            errors, _ = await smtp.sendmail("sender@example.com", ["rcpt@example.org"],
                                            _message(tag))
            assert errors == {}
            return response.code

    # When a client logs in with a wrong password, then with the right one and sends
    failure = asyncio.run(wrong_password())
    code = asyncio.run(good_password())
    # Then the wrong one gets 535 5.7.8 and the right one 235 and its mail is relayed
    assert failure.code == 535
    assert failure.message.startswith("5.7.8")
    assert code == 235
    delivered = auth_relay.wait_delivered(before + 1)
    assert any(tag.encode() in m.data for m in delivered)


def test_sasl_relay_refuses_unauthenticated_and_plaintext_clients(
    auth_relay: PostfixRelay,
) -> None:
    # Given the relay that requires STARTTLS and AUTH
    async def without_login() -> aiosmtplib.SMTPRecipientRefused:
        async with _client(auth_relay, "mail.example.com") as smtp:
            await smtp.mail("sender@example.com")
            with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
                await smtp.rcpt("rcpt@example.org")
            return refused.value

    async def without_tls() -> aiosmtplib.SMTPSenderRefused:
        smtp = aiosmtplib.SMTP(hostname=auth_relay.host, port=auth_relay.port,
                               local_hostname="mail.example.com", timeout=10, start_tls=False)
        async with smtp:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail("sender@example.com")
            return refused.value

    # When a client skips AUTH, or skips STARTTLS
    relay_denied = asyncio.run(without_login())
    tls_required = asyncio.run(without_tls())
    # Then the replies are the ones SPEC 5 calls relay errors: not the recipient's fault
    assert relay_denied.code == 554
    assert "Relay access denied" in relay_denied.message
    assert tls_required.code == 530
    assert tls_required.message.startswith("5.7.0")


def test_relay_starts_quickly_and_leaves_nothing_behind() -> None:
    # Given a relay with every option on
    with running_postfix(require_tls=True, auth=True) as relay:
        pids = (relay.master_pid, relay.dovecot_pid)
        directory, port = relay.directory, relay.port
        assert directory is not None and (directory / "queue" / "active").is_dir()
        startup = relay.startup_seconds
    # When it is closed
    # Then Postfix and Dovecot are gone, the port is closed, the directory removed, and
    # it had come up within seconds
    assert not any(pid_running(pid) for pid in pids)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    assert not directory.exists()
    assert startup < 10.0


def test_a_missing_postfix_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a machine without Postfix
    monkeypatch.setattr(relays, "POSTFIX", "/nonexistent/postfix")
    # When a test asks for a relay under CI=true, then it fails
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="postfix is required under CI"):
        relays.require_postfix()
    # And elsewhere it is skipped
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        relays.require_postfix()
