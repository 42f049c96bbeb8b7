"""Pure reply classification: which refusals blame the client (SPEC 5), and what is logged."""

from __future__ import annotations

import string
from email.utils import parseaddr

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer.smtp import replies
from mailer.smtp.replies import Outcome, Stage, blames_client, redacted, reply
from tests.smtp_servers import SimpleEnvelope


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


_ATEXT_CHARS = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
_ATOM = st.text(alphabet=_ATEXT_CHARS, min_size=1, max_size=6)
_LABEL = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=6)


@given(st.lists(_ATOM, min_size=1, max_size=3), st.lists(_LABEL, min_size=1, max_size=3))
def test_plain_addresses_are_what_parseaddr_leaves_unchanged(local: list[str],
                                                             domain: list[str]) -> None:
    """The dot-atom shortcut only skips addresses the full check would pass as well."""
    address = ".".join(local) + "@" + ".".join(domain)
    assert replies._PLAIN_ADDRESS.fullmatch(address)
    assert parseaddr(address)[1] == address
    assert not replies._FORBIDDEN_IN_ADDRESS.search(address)
    assert replies.envelope_problem(SimpleEnvelope(address, (address,), b"")) is None


@given(st.text(alphabet=string.printable + "\u00e9", max_size=20))
def test_any_address_gets_the_full_check_unless_plain(address: str) -> None:
    """Whatever the shortcut accepts, parseaddr would have accepted unchanged."""
    problem = replies._address_problem(address, may_be_empty=False)
    full = (address == "" or not address.isascii()
            or bool(replies._FORBIDDEN_IN_ADDRESS.search(address))
            or parseaddr(address)[1] != address)
    assert (problem is not None) == full


@pytest.mark.parametrize("address", ["a b@x.y", "<a@x.y>", "a@x.y>", "\"a b\"@x.y",
                                     "a@x.y, b@x.y", "a(c)@x.y", "é@x.y", ""])
def test_addresses_parseaddr_would_rewrite_are_refused(address: str) -> None:
    result = replies.envelope_problem(SimpleEnvelope("s@x.y", (address,), b""))
    assert result is not None and result.stage is Stage.ENVELOPE
