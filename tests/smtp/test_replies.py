"""Pure reply classification: which refusals blame the client (SPEC 5), and what is logged."""

from __future__ import annotations

import pytest

from mailer.smtp.replies import Outcome, Stage, blames_client, redacted, reply


@pytest.mark.parametrize(
    ("code", "text", "stage"),
    [
        # Real Postfix replies (tests/smtp/test_relays.py provokes each of them)
        (535, "5.7.8 Error: authentication failed: authentication failure", Stage.CONNECT),
        (530, "5.7.0 Must issue a STARTTLS command first", Stage.MAIL),
        (554, "5.7.1 <rcpt@example.org>: Relay access denied", Stage.RCPT),
        (504, "5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname",
         Stage.RCPT),
        # Other relays' wording
        (530, "5.7.0 Authentication required", Stage.MAIL),
        (550, "5.7.0 Authentication required", Stage.MAIL),
        (550, "5.7.8 Credentials invalid", Stage.MAIL),
        (550, "5.7.1 Relaying denied", Stage.MAIL),
        (530, "5.7.57 Client not authenticated to send mail", Stage.RCPT),
        (454, "4.7.0 TLS not available due to local problem", Stage.CONNECT),
        (501, "5.5.2 Syntax: EHLO hostname", Stage.CONNECT),
    ],
)
def test_refusals_of_the_client_are_deferred_relay_errors(
    code: int, text: str, stage: Stage
) -> None:
    # When such a reply arrives, then it blames us: deferred, never failed or a bad user
    assert blames_client(code, text, stage)
    result = reply(code, text, stage)
    assert result.outcome is Outcome.DEFERRED and result.relay_error
    assert not result.is_user_unknown


@pytest.mark.parametrize(
    ("code", "text", "stage", "outcome"),
    [
        (550, "5.1.1 <rcpt@example.org>: Recipient address rejected: User unknown",
         Stage.RCPT, Outcome.FAILED),
        (550, "5.7.1 Message rejected as spam", Stage.DATA, Outcome.FAILED),
        (550, "5.7.1 Recipient does not accept mail from you", Stage.RCPT, Outcome.FAILED),
        (421, "4.7.0 Too many connections, try again later", Stage.CONNECT, Outcome.DEFERRED),
        (421, "4.7.0 Try again later", Stage.MAIL, Outcome.DEFERRED),
        (451, "4.7.1 Greylisted, try again later", Stage.RCPT, Outcome.DEFERRED),
        (554, "5.7.0 Authentication required", Stage.DATA, Outcome.FAILED),
    ],
)
def test_refusals_of_the_message_or_the_recipient_are_not(
    code: int, text: str, stage: Stage, outcome: Outcome
) -> None:
    result = reply(code, text, stage)
    assert not result.relay_error and result.outcome is outcome


def test_logged_reply_texts_carry_no_addresses() -> None:
    text = "5.7.1 <rcpt@example.org>: Relay access denied for sender@example.com"
    assert redacted(text) == "5.7.1 <address>: Relay access denied for <address>"
