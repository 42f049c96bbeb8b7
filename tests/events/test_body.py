"""The body and signed headers of an event webhook (SPEC 13), checked with the client's
own verifier, as a receiver would."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from mailer.client import verify_webhook
from mailer.client.errors import WebhookVerificationError
from mailer.events.body import (
    FOR_STATUS,
    MESSAGE_KEYS,
    EventType,
    encode,
    envelope,
    message_data,
    new_event_id,
    reply_code,
    signed_headers,
)
from mailer.events.secrets import SECRET_BYTES, new_secret
from mailer.store.status import MessageStatus

AT = datetime(2026, 3, 1, 12, 30, 5, 250000, tzinfo=UTC)


def sample(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = dict(
        message_id="m1", status="sent", reason=None, category="service_alert",
        template="service_alert", to="ada@example.org", recipient_external_id="ext-1",
        campaign_id=None, smtp_code=250)
    values.update(overrides)
    return message_data(**values)  # type: ignore[arg-type]


def test_a_message_event_has_every_key_null_when_it_does_not_apply() -> None:
    # Given a message sent without a campaign and with no reason
    data = sample()
    # When it is wrapped into a body and encoded
    body = json.loads(encode(envelope(EventType.MESSAGE_SENT, AT, data)))
    # Then it has exactly the SPEC's keys, the absent ones null rather than missing
    assert list(body) == ["type", "timestamp", "data"]
    assert body["type"] == "message.sent"
    assert body["timestamp"] == "2026-03-01T12:30:05.250000Z"
    assert tuple(body["data"]) == MESSAGE_KEYS
    assert body["data"]["campaign_id"] is None and body["data"]["reason"] is None
    assert body["data"]["smtp_code"] == 250 and body["data"]["to"] == "ada@example.org"


def test_every_state_a_service_hears_of_has_its_event_type() -> None:
    # The states that raise events, and only those (held, cancelled... are ours alone)
    assert {s.value for s in FOR_STATUS} == {
        "sent", "deferred", "failed", "unknown", "suppressed", "bounced", "complained"}
    for status, kind in FOR_STATUS.items():
        assert kind.value == f"message.{status}"
    assert MessageStatus.HELD not in FOR_STATUS and MessageStatus.QUEUED not in FOR_STATUS
    assert {t.value for t in EventType} - {f"message.{s}" for s in FOR_STATUS} == {
        "recipient.unsubscribed", "campaign.completed"}


def test_the_body_is_ascii_json_that_encodes_the_same_every_time() -> None:
    # Given data with a non-ASCII name in it
    body = envelope(EventType.MESSAGE_SENT, AT, sample(to="zoë@exämple.org"))
    # When encoded twice, Then the text is the same and pure ASCII
    assert encode(body) == encode(body)
    assert encode(body).isascii()
    assert json.loads(encode(body))["data"]["to"] == "zoë@exämple.org"


def test_secrets_are_whsec_and_base64_of_random_bytes() -> None:
    # When two secrets are made
    first, second = new_secret(), new_secret()
    # Then each is whsec_ + base64 of SECRET_BYTES bytes, and they differ
    for secret in (first, second):
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) \
            == SECRET_BYTES
    assert first != second
    assert new_event_id().startswith("msg_") and new_event_id() != new_event_id()


def test_signed_headers_verify_with_the_client_and_fail_when_tampered() -> None:
    # Given an event signed for one attempt
    secret, event_id = new_secret(), new_event_id()
    body = encode(envelope(EventType.MESSAGE_BOUNCED, AT, sample(status="bounced"))).encode()
    stamp = 1_770_000_000
    headers = signed_headers(secret, event_id, body, stamp)
    # Then the Standard Webhooks headers are there
    assert headers["webhook-id"] == event_id
    assert headers["webhook-timestamp"] == str(stamp)
    assert headers["webhook-signature"].startswith("v1,")
    # And the client's verifier accepts it and returns the body
    assert verify_webhook(secret, headers, body, now=stamp + 10)["type"] == "message.bounced"
    # But not with another secret, another body, or another id
    with pytest.raises(WebhookVerificationError):
        verify_webhook(new_secret(), headers, body, now=stamp)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, headers, body.replace(b"bounced", b"sent"), now=stamp)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, {**headers, "webhook-id": new_event_id()}, body, now=stamp)


def test_a_retry_is_signed_afresh_under_the_same_id() -> None:
    # Given the same event sent twice, an hour apart
    secret, event_id, body = new_secret(), new_event_id(), b'{"type":"message.sent"}'
    first = signed_headers(secret, event_id, body, 1_770_000_000)
    retry = signed_headers(secret, event_id, body, 1_770_003_600)
    # Then the id is the same, the timestamp and signature are new, and each verifies
    assert first["webhook-id"] == retry["webhook-id"]
    assert first["webhook-signature"] != retry["webhook-signature"]
    verify_webhook(secret, retry, body, now=1_770_003_601)
    # And the first one, replayed an hour later, is refused as stale
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, first, body, now=1_770_003_601)


@pytest.mark.parametrize(("diagnostic", "code"), [
    ("smtp; 550 5.1.1 <a@b>: user unknown", 550),
    ("SMTP;421 4.7.0 try later", 421),
    ("550-5.1.1 The email account does not exist", 550),
    ("5.1.1 mailbox gone", None),
    ("x-unknown; 5501 odd", None),
    (None, None),
])
def test_the_reply_code_of_a_bounce_diagnostic(diagnostic: str | None, code: int | None) -> None:
    assert reply_code(diagnostic) == code
