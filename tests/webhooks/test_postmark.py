"""Postmark: HTTP basic auth in constant time, routed on RecordType and Type."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

import pytest

from mailer.reports.vocabulary import EventType, WebhookEvent, stable_event_id
from mailer.webhooks import handle, postmark
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import NotConfigured, ParseError, VerificationFailed
from tests.webhooks.conftest import NOW
from tests.webhooks.signing import basic_auth, fixture_bytes, fixture_json, flip_bit

USER, PASSWORD = "postmark", secrets.token_urlsafe(24)
AUTH = basic_auth(USER, PASSWORD)


@pytest.fixture()
def config() -> WebhookConfig:
    """Given Postmark configured with webhook credentials."""
    return WebhookConfig.from_mapping(
        {"postmark_webhook_user": USER, "postmark_webhook_password": PASSWORD}
    )


def _with(fixture: str, **fields: Any) -> bytes:
    record = fixture_json(fixture)
    record.update(fields)
    return json.dumps(record).encode()


def test_hard_bounce(config: WebhookConfig) -> None:
    # Given an authenticated HardBounce record / When handled
    events = handle(postmark, AUTH, fixture_bytes("postmark_bounce.json"), config, NOW)
    # Then every field is normalised; our Message-ID comes from Metadata, not MessageID
    assert events == [
        WebhookEvent(
            provider="postmark", event_id="Bounce:4323372036854775807",
            type=EventType.HARD_BOUNCE, recipient="nobody@example.org",
            occurred_at=datetime(2024, 1, 1, 5, 0, 2, 396393, tzinfo=UTC),
            message_id="msg-42@example.com",
            diagnostic="smtp;550 5.1.1 The email account that you tried to reach does not exist.",
            enhanced_status="5.1.1", policy_rejection=False, raw_type="Bounce/HardBounce",
        )
    ]


def test_spam_complaint(config: WebhookConfig) -> None:
    # Given an authenticated SpamComplaint record / When handled
    events = handle(postmark, AUTH, fixture_bytes("postmark_spam_complaint.json"), config, NOW)
    # Then it is a complaint with no Message-ID of ours (Postmark's MessageID is not ours)
    assert events == [
        WebhookEvent(
            provider="postmark", event_id="SpamComplaint:42", type=EventType.COMPLAINT,
            recipient="angry@example.org", occurred_at=datetime(2024, 1, 1, 1, tzinfo=UTC),
            message_id=None, diagnostic="Test spam complaint details", enhanced_status=None,
            policy_rejection=False, raw_type="SpamComplaint/SpamComplaint",
        )
    ]


def test_delivery(config: WebhookConfig) -> None:
    # Given an authenticated Delivery record (which has no ID of its own) / When handled
    events = handle(postmark, AUTH, fixture_bytes("postmark_delivery.json"), config, NOW)
    # Then it is delivered, with a stable id from Postmark's MessageID and the recipient
    assert events == [
        WebhookEvent(
            provider="postmark",
            event_id=stable_event_id("postmark", "Delivery",
                                     "883953f4-6105-42a2-a16a-77a8eac79483",
                                     "someone@example.org"),
            type=EventType.DELIVERED, recipient="someone@example.org",
            occurred_at=datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC),
            message_id="msg-47@example.com", diagnostic="Test delivery webhook details",
            enhanced_status=None, policy_rejection=False, raw_type="Delivery",
        )
    ]


def test_subscription_change_to_suppressed_is_an_unsubscribe(config: WebhookConfig) -> None:
    # Given an authenticated SubscriptionChange with SuppressSending true / When handled
    events = handle(postmark, AUTH, fixture_bytes("postmark_subscription_change.json"), config,
                             NOW)
    # Then it is an unsubscribe with a stable id
    assert events == [
        WebhookEvent(
            provider="postmark",
            event_id=stable_event_id("postmark", "SubscriptionChange",
                                     "a4909a96-73d7-4c49-b148-a54522d3f7ac",
                                     "leaver@example.org", "2024-01-01T02:17:32Z",
                                     "ManualSuppression"),
            type=EventType.UNSUBSCRIBE, recipient="leaver@example.org",
            occurred_at=datetime(2024, 1, 1, 2, 17, 32, tzinfo=UTC), message_id=None,
            diagnostic=None, enhanced_status=None, policy_rejection=False,
            raw_type="SubscriptionChange/ManualSuppression",
        )
    ]


def test_reactivation_is_ignored(config: WebhookConfig) -> None:
    # Given SuppressSending false (a reactivation) / When handled / Then nothing happens:
    # only the recipient's own action through our consent flow lifts a block
    body = _with("postmark_subscription_change.json", SuppressSending=False,
                 SuppressionReason=None)
    assert handle(postmark, AUTH, body, config, NOW) == []


@pytest.mark.parametrize(
    ("bounce_type", "expected"),
    [
        ("HardBounce", (EventType.HARD_BOUNCE, False)),
        ("BadEmailAddress", (EventType.HARD_BOUNCE, False)),
        ("SoftBounce", (EventType.SOFT_BOUNCE, False)),
        ("Transient", (EventType.SOFT_BOUNCE, False)),
        ("DnsError", (EventType.SOFT_BOUNCE, False)),
        ("Blocked", (EventType.SOFT_BOUNCE, True)),
        ("DMARCPolicy", (EventType.SOFT_BOUNCE, True)),
        ("SpamNotification", (EventType.COMPLAINT, False)),
        ("Unsubscribe", (EventType.UNSUBSCRIBE, False)),
        ("AutoResponder", None),
        ("Subscribe", None),
        ("ManuallyDeactivated", None),
        ("SomethingPostmarkAddsLater", None),
    ],
)
def test_bounce_types(bounce_type: str, expected: tuple[EventType, bool] | None) -> None:
    # Given a verified Bounce record of a given Type, with an ordinary 5.1.1 detail
    body = _with("postmark_bounce.json", Type=bounce_type)
    # When parsed / Then the plain-dict table decides the outcome
    events = postmark.parse({}, body)
    assert [(e.type, e.policy_rejection) for e in events] == ([expected] if expected else [])


def test_message_id_from_bounce_content() -> None:
    # Given a bounce with the dump of our original message and no metadata
    body = _with("postmark_bounce.json", Metadata={},
                 Content="Message-ID: <msg-99@example.com>\r\nSubject: Sale\r\n\r\nHello")
    # When parsed / Then our Message-ID is read from the dump
    assert postmark.parse({}, body)[0].message_id == "msg-99@example.com"


def test_same_body_twice_has_stable_event_ids(config: WebhookConfig) -> None:
    # Given a record Postmark retries / When handled twice / Then the ids match
    body = fixture_bytes("postmark_bounce.json")
    first, second = (handle(postmark, AUTH, body, config, NOW) for _ in range(2))
    assert first[0].event_id == second[0].event_id


@pytest.mark.parametrize(
    "headers",
    [
        basic_auth(USER, PASSWORD + "x"),
        basic_auth(USER + "x", PASSWORD),
        basic_auth(USER, ""),
        basic_auth("", PASSWORD),
        basic_auth(USER, "pässword"),
        {"Authorization": "Bearer " + PASSWORD},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Basic " + "dXNlcg=="},  # "user" without a colon
        {"Authorization": ""},
        {},
    ],
)
def test_wrong_or_missing_credentials_fail(
    config: WebhookConfig, headers: dict[str, str]
) -> None:
    # Given wrong, malformed or missing credentials / When handled / Then 401
    with pytest.raises(VerificationFailed):
        handle(postmark, headers, fixture_bytes("postmark_bounce.json"), config, NOW)


def test_credentials_header_is_case_insensitive(config: WebhookConfig) -> None:
    # Given a lower-cased header name / When handled / Then it authenticates
    headers = {"authorization": AUTH["Authorization"]}
    assert handle(postmark, headers, fixture_bytes("postmark_bounce.json"), config, NOW)


def test_body_is_not_signed(config: WebhookConfig) -> None:
    # Given the right credentials with a bit-flipped or re-serialised body
    body = fixture_bytes("postmark_bounce.json")
    altered = flip_bit(body, body.index(b"nobody") + 1)
    reserialised = json.dumps(json.loads(body)).encode()
    # When handled / Then both pass: Postmark signs nothing, so only the credentials and
    # HTTPS protect the request (documented; no timestamp exists to check either)
    assert handle(postmark, AUTH, altered, config, NOW)[0].recipient == "nnbody@example.org"
    assert handle(postmark, AUTH, reserialised, config, NOW)


def test_unconfigured_is_refused() -> None:
    # Given only a user configured / When a request arrives / Then NotConfigured (404)
    config = WebhookConfig(postmark_user=USER)
    with pytest.raises(NotConfigured):
        handle(postmark, AUTH, fixture_bytes("postmark_bounce.json"), config, NOW)


@pytest.mark.parametrize(
    "body",
    [b"[]", b"nope", b'{"RecordType": "Bounce"}', b'{"RecordType": "Bounce", "Type": 1}',
     b'{"RecordType": "Bounce", "Type": "HardBounce", "ID": 1, "Email": "a@b",'
     b' "BouncedAt": "yesterday"}'],
)
def test_malformed_authentic_body_is_a_parse_error(config: WebhookConfig, body: bytes) -> None:
    # Given an authenticated body of the wrong shape / When handled / Then ParseError (400)
    with pytest.raises(ParseError):
        handle(postmark, AUTH, body, config, NOW)


def test_open_and_click_are_ignored(config: WebhookConfig) -> None:
    # Given an Open record / When handled / Then there is nothing to act on
    body = json.dumps({"RecordType": "Open", "MessageID": "x", "Recipient": "a@b"}).encode()
    assert handle(postmark, AUTH, body, config, NOW) == []


def test_bounce_without_email_is_accepted_for_our_message_id() -> None:
    # Given a SpamComplaint record that lacks Email but carries our Message-ID in Metadata
    record = fixture_json("postmark_bounce.json")
    del record["Email"]
    record.update(RecordType="SpamComplaint", Type="SpamComplaint")
    # When parsed
    [event] = postmark.parse({}, json.dumps(record).encode())
    # Then it is a complaint naming nobody, left to our Message-ID to find the person
    # (SPEC 8: applied as far as it can be, never a 400)
    assert (event.type, event.recipient, event.message_id) == (
        EventType.COMPLAINT, None, "msg-42@example.com")
