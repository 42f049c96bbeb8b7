"""Reports posted by our MTA with a bearer token, read by mailer.reports.read_report.

The reader itself is tested on the labelled corpus (tests/reports); these tests check the
webhook's side: the token, the size limit, what is no mail at all, and how a report's
recipients become events (SPEC 4: hard only with evidence, policy and delays never
suppress).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

import pytest

from mailer.reports.vocabulary import EventType, WebhookEvent, stable_event_id
from mailer.webhooks import dsn, handle
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import (
    BodyTooLarge,
    NotConfigured,
    ParseError,
    VerificationFailed,
)
from tests.webhooks.conftest import NOW
from tests.webhooks.signing import fixture_bytes

TOKEN = secrets.token_urlsafe(32)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: A day after the fixtures' reports were written.
LATER = datetime(2024, 1, 2, tzinfo=UTC)


@pytest.fixture()
def config() -> WebhookConfig:
    """Given the DSN endpoint configured with a bearer token."""
    return WebhookConfig.from_mapping({"dsn_webhook_token": TOKEN})


def _key(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def test_dsn_fixture_gives_one_event_per_recipient(config: WebhookConfig) -> None:
    # Given the DSN fixture: one "failed 5.1.1" and one "delayed 4.2.2" recipient
    body = fixture_bytes("dsn.eml")
    # When handled
    events = handle(dsn, AUTH, body, config, NOW)
    # Then both recipients are reported, dated by the report, with our Message-ID: the
    # failure a hard bounce, the delay only a deferral (it never suppresses)
    when = datetime(2024, 1, 1, 0, 0, 10, tzinfo=UTC)
    assert events == [
        WebhookEvent(
            provider="dsn",
            event_id=stable_event_id("dsn", "bounce", _key(body), "nobody@example.org", "hard"),
            type=EventType.HARD_BOUNCE, recipient="nobody@example.org", occurred_at=when,
            message_id="msg-42@example.com",
            diagnostic="550 5.1.1 <nobody@example.org>: Recipient address rejected: "
            "User unknown",
            enhanced_status="5.1.1", policy_rejection=False, raw_type="rfc3464/hard",
        ),
        WebhookEvent(
            provider="dsn",
            event_id=stable_event_id("dsn", "bounce", _key(body), "full@example.org",
                                     "delayed"),
            type=EventType.DEFERRED, recipient="full@example.org", occurred_at=when,
            message_id="msg-42@example.com", diagnostic="452 4.2.2 Mailbox full",
            enhanced_status="4.2.2", policy_rejection=False, raw_type="rfc3464/delayed",
        ),
    ]


def _dsn_with(status: str, diagnostic: str, action: str = "failed") -> bytes:
    body = fixture_bytes("dsn.eml")
    return (
        body.replace(b"Action: failed", f"Action: {action}".encode())
        .replace(b"Status: 5.1.1", f"Status: {status}".encode())
        .replace(b"smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown",
                 diagnostic.encode())
    )


@pytest.mark.parametrize(
    ("status", "diagnostic", "action", "type_", "policy"),
    [
        ("5.7.1", "smtp; 550 5.7.1 Rejected by policy", "failed", EventType.HARD_BOUNCE, True),
        ("5.2.2", "smtp; 552 5.2.2 Over quota", "failed", EventType.SOFT_BOUNCE, False),
        ("4.4.7", "smtp; 421 4.4.7 Gave up", "failed", EventType.SOFT_BOUNCE, False),
        ("2.0.0", "smtp; 250 2.0.0 OK", "failed", EventType.SOFT_BOUNCE, False),
        ("5.1.1", "smtp; 550 5.1.1 unknown", "bounced", EventType.HARD_BOUNCE, False),
    ],
)
def test_action_and_status_decide_the_type(
    status: str, diagnostic: str, action: str, type_: EventType, policy: bool
) -> None:
    # Given the first recipient's Action/Status changed / When parsed
    first = dsn.parse({}, _dsn_with(status, diagnostic, action), NOW)[0]
    # Then class 5 is hard (5.2.2 soft per RFC 3463), 5.7.x flagged as the sender's
    # problem, 4.x.x soft, a "failure" with 2.0.0 soft, and an unknown Action is read by
    # its Status
    assert (first.recipient, first.type, first.enhanced_status, first.policy_rejection) == (
        "nobody@example.org", type_, status, policy)


@pytest.mark.parametrize("action", ["relayed", "delivered", "expanded"])
def test_successful_recipients_give_no_event(action: str) -> None:
    # Given a recipient whose Action says it got through / When parsed
    events = dsn.parse({}, _dsn_with("2.0.0", "smtp; 250 OK", action), NOW)
    # Then only the other recipient remains
    assert [e.recipient for e in events] == ["full@example.org"]


def test_policy_rejection_without_a_permanent_status_is_only_recorded() -> None:
    # Given a 4.7.1 refusal for the sender's reasons (greylisting, a blocklist)
    body = _dsn_with("4.7.1", "smtp; 450 4.7.1 Client host rejected: blocked by policy")
    # When parsed / Then it is a deferral, never a soft bounce that counts toward the limit
    first = dsn.parse({}, body, NOW)[0]
    assert (first.type, first.policy_rejection) == (EventType.DEFERRED, True)


def test_report_date_in_the_future_is_clamped_to_arrival() -> None:
    # Given a report whose Date lies after its arrival (a wrong clock at the MTA)
    body = fixture_bytes("dsn.eml").replace(b"Date: Mon, 01 Jan 2024 00:00:10 +0000",
                                            b"Date: Mon, 01 Jan 2224 00:00:10 +0000")
    # When parsed / Then its events are dated when it arrived, not in the future
    assert {e.occurred_at for e in dsn.parse({}, body, NOW)} == {NOW}


def test_utf8_address_type_is_decoded() -> None:
    # Given an RFC 6533 utf-8 address with an escaped character
    body = fixture_bytes("dsn.eml").replace(
        b"Original-Recipient: rfc822; nobody@example.org",
        b"Original-Recipient: utf-8; j\\x{F6}rg@example.org",
    )
    # When parsed / Then the address is decoded
    assert dsn.parse({}, body, NOW)[0].recipient == "jörg@example.org"


def test_original_recipient_wins_over_final_recipient() -> None:
    # Given a report whose Final-Recipient is a forwarding target we never mailed
    body = fixture_bytes("dsn.eml").replace(
        b"Final-Recipient: rfc822; nobody@example.org",
        b"Final-Recipient: rfc822; forwarded@elsewhere.example",
    )
    # When parsed / Then the recipient is the address we mailed (SPEC 4)
    assert dsn.parse({}, body, NOW)[0].recipient == "nobody@example.org"


def test_other_address_types_are_skipped() -> None:
    # Given an x400 Original-Recipient and an rfc822 Final-Recipient
    body = fixture_bytes("dsn.eml").replace(
        b"Original-Recipient: rfc822; nobody@example.org",
        b"Original-Recipient: x400; /G=Nobody/S=Example/",
    )
    # When parsed / Then the rfc822 one is taken
    assert dsn.parse({}, body, NOW)[0].recipient == "nobody@example.org"


def test_report_without_a_usable_recipient_is_one_nameless_event() -> None:
    # Given a failure report whose every recipient is of an address type we never mail
    body = (fixture_bytes("dsn.eml")
            .replace(b"rfc822; nobody@example.org", b"x400; /G=Nobody/")
            .replace(b"rfc822; full@example.org", b"x400; /G=Full/"))
    # When parsed
    events = dsn.parse({}, body, NOW)
    # Then one event names nobody and carries no Message-ID: the caller counts it as
    # unrecognised and acts on no one (SPEC 4)
    assert [(e.recipient, e.message_id) for e in events] == [(None, None)]


def test_arf_fixture_is_a_complaint(config: WebhookConfig) -> None:
    # Given the ARF fixture (Feedback-Type abuse, Original-Rcpt-To present)
    body = fixture_bytes("arf.eml")
    # When handled a day later
    events = handle(dsn, AUTH, body, config, LATER)
    # Then it is a complaint for that recipient, dated by the report, with our Message-ID
    assert events == [
        WebhookEvent(
            provider="dsn",
            event_id=stable_event_id("dsn", "feedback", _key(body), "user@isp.example"),
            type=EventType.COMPLAINT, recipient="user@isp.example",
            occurred_at=datetime(2024, 1, 1, 1, tzinfo=UTC), message_id="msg-43@example.com",
            diagnostic=None, enhanced_status=None, policy_rejection=False,
            raw_type="feedback/abuse",
        )
    ]


def test_redacted_arf_returns_our_message_id_for_lookup(config: WebhookConfig) -> None:
    # Given an ARF report without Original-Rcpt-To and with the original's To redacted
    body = fixture_bytes("arf_redacted.eml")
    # When handled a day later
    events = handle(dsn, AUTH, body, config, LATER)
    # Then the recipient is unknown and our Message-ID is given for the caller to look up;
    # the redacted To header is never taken as the recipient; the id uses the report's own
    # Message-ID
    assert events == [
        WebhookEvent(
            provider="dsn",
            event_id=stable_event_id("dsn", "feedback", "<report-7@isp.example>", None),
            type=EventType.COMPLAINT, recipient=None,
            occurred_at=datetime(2024, 1, 1, 1, tzinfo=UTC), message_id="msg-43@example.com",
            diagnostic=None, enhanced_status=None, policy_rejection=False,
            raw_type="feedback/abuse",
        )
    ]


def test_arf_opt_out_is_an_unsubscribe() -> None:
    # Given an ARF report with Feedback-Type opt-out (the person asked to be taken off)
    body = fixture_bytes("arf.eml").replace(b"Feedback-Type: abuse", b"Feedback-Type: opt-out")
    # When parsed / Then it is an unsubscribe for that recipient, not a complaint
    [event] = dsn.parse({}, body, NOW)
    assert (event.type, event.recipient) == (EventType.UNSUBSCRIBE, "user@isp.example")


@pytest.mark.parametrize("feedback", ["not-spam", "auth-failure", "virus"])
def test_non_complaint_feedback_types_are_ignored(feedback: str) -> None:
    # Given an ARF report whose Feedback-Type is not a person's complaint
    body = fixture_bytes("arf.eml").replace(b"Feedback-Type: abuse",
                                            f"Feedback-Type: {feedback}".encode())
    # When parsed / Then nothing is reported
    assert dsn.parse({}, body, NOW) == []


def test_arf_with_neither_recipient_nor_message_id_names_nobody() -> None:
    # Given a redacted report whose original headers lack a Message-ID
    body = fixture_bytes("arf_redacted.eml").replace(b"Message-ID: <msg-43@example.com>\r\n", b"")
    # When parsed / Then one complaint names nobody: accepted and counted as unrecognised
    # by the caller, never acted on (SPEC 4)
    [event] = dsn.parse({}, body, NOW)
    assert (event.type, event.recipient, event.message_id) == (EventType.COMPLAINT, None, None)


def test_auto_reply_is_not_a_report() -> None:
    # Given an out-of-office reply sent to the bounce address / When parsed / Then no events
    body = (b"From: a@example.org\r\nSubject: Out of office\r\nAuto-Submitted: auto-replied\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n"
            b"I am out of the office until Monday and will reply on my return.\r\n")
    assert dsn.parse({}, body, NOW) == []


def test_mail_the_reader_cannot_read_is_one_nameless_event() -> None:
    # Given a short message with no failure in it / When parsed
    body = (b"From: a@example.org\r\nSubject: Hello\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\nHi")
    # Then it is accepted and counted unrecognised by the caller, naming nobody
    assert [(e.recipient, e.message_id) for e in dsn.parse({}, body, NOW)] == [(None, None)]


@pytest.mark.parametrize(
    "body", [b"", b"this is not a report", b'{"Type": "Notification"}',
             b"Subject: only a subject\r\n\r\nbody"],
)
def test_body_that_is_no_mail_message_is_a_parse_error(body: bytes) -> None:
    # Given a body without the From and Date every message has (RFC 5322 section 3.6)
    # When parsed / Then it is unparseable (400), unlike an auto-reply, which is mail
    with pytest.raises(ParseError):
        dsn.parse({}, body, NOW)


@pytest.mark.parametrize(
    "body",
    [
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n--B--\r\n",
        b"Content-Type: multipart/report; report-type=feedback-report; boundary=B\r\n\r\n--B--\r\n",
    ],
)
def test_report_without_its_report_part_or_headers_is_a_parse_error(body: bytes) -> None:
    # Given a bare multipart/report skeleton, no From or Date / When parsed / Then 400
    with pytest.raises(ParseError):
        dsn.parse({}, body, NOW)


def test_deeply_nested_message_is_read_without_error() -> None:
    # Given a mail message with thousands of nested multiparts, which exhaust the stdlib
    # parser's recursion
    body = b"From: a@example.org\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n" + b"".join(
        b"Content-Type: multipart/mixed; boundary=a%d\r\n\r\n--a%d\r\n" % (i, i)
        for i in range(3000)
    )
    # When parsed / Then it is accepted as naming nobody, not a RecursionError
    assert [(e.recipient, e.message_id) for e in dsn.parse({}, body, NOW)] == [(None, None)]


def test_same_report_twice_has_stable_event_ids(config: WebhookConfig) -> None:
    # Given the same report posted twice / When handled twice / Then the ids match
    body = fixture_bytes("dsn.eml")
    first, second = (handle(dsn, AUTH, body, config, NOW) for _ in range(2))
    assert [e.event_id for e in first] == [e.event_id for e in second]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer ünïcode"},
    ],
)
def test_wrong_or_missing_token_fails(config: WebhookConfig, headers: dict[str, str]) -> None:
    # Given a wrong, malformed or missing bearer token / When handled / Then 401
    with pytest.raises(VerificationFailed):
        handle(dsn, headers, fixture_bytes("dsn.eml"), config, NOW)


def test_token_scheme_and_header_name_are_case_insensitive(config: WebhookConfig) -> None:
    # Given "authorization: bearer <token>" / When handled / Then it authenticates
    assert handle(dsn, {"authorization": f"bearer {TOKEN}"}, fixture_bytes("dsn.eml"), config,
                      NOW)


def test_unconfigured_is_refused() -> None:
    # Given no MAILER_DSN_WEBHOOK_TOKEN / When a report arrives / Then NotConfigured (404)
    with pytest.raises(NotConfigured):
        handle(dsn, AUTH, fixture_bytes("dsn.eml"), WebhookConfig(), NOW)


def test_body_over_five_mebibytes_is_refused(config: WebhookConfig) -> None:
    # Given a report larger than the DSN limit / When handled / Then BodyTooLarge (413)
    with pytest.raises(BodyTooLarge):
        handle(dsn, AUTH, b"x" * (dsn.MAX_BODY + 1), config, NOW)


@pytest.mark.parametrize("shape", ["attachment", "header", "blocks", "junk"])
def test_one_megabyte_input_parses_or_is_refused(shape: str) -> None:
    # Given about 1 MB shaped as a big attached original, one huge header field, thousands
    # of recipient blocks, or plain junk
    base = fixture_bytes("dsn.eml")
    mb = 1024 * 1024
    line = b"A" * 76 + b"\r\n"
    if shape == "attachment":
        body = base.replace(b"Message-ID: <msg-42@example.com>\r\n",
                            b"Message-ID: <msg-42@example.com>\r\n\r\n" + line * (mb // 78))
    elif shape == "header":
        body = base.replace(b"Subject: Undelivered", b"Subject: " + b"x" * mb + b" Undelivered")
    elif shape == "blocks":
        block = b"Final-Recipient: rfc822; r@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        anchor = b"Final-Recipient: rfc822; full@example.org"
        body = base.replace(anchor, block * (mb // len(block)) + anchor)
    else:
        body = bytes(range(256)) * (mb // 256)
    assert len(body) >= mb * 0.9
    # When parsed / Then it returns events or raises ParseError, nothing else
    try:
        events = dsn.parse({}, body, NOW)
    except ParseError:
        return
    assert all(isinstance(e, WebhookEvent) for e in events)
