"""Mailgun: HMAC of timestamp + token, 5-minute window, one-time tokens, events mapped."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta

import pytest

from mailer.reports.vocabulary import EventType, WebhookEvent
from mailer.webhooks import handle, mailgun
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import NotConfigured, ParseError, Replayed, VerificationFailed
from mailer.webhooks._support.replay import MemorySeenTokens
from tests.webhooks.conftest import NOW
from tests.webhooks.signing import fixture_json, flip_bit, mailgun_body

STAMP = str(int(NOW.timestamp()))


@pytest.fixture()
def key() -> str:
    """A random webhook signing key, made for this test."""
    return secrets.token_hex(32)


@pytest.fixture()
def config(key: str) -> WebhookConfig:
    """Given Mailgun configured, with an in-memory token store on the test clock."""
    return WebhookConfig(mailgun_signing_key=key, seen_tokens=MemorySeenTokens(lambda: NOW))


def _body(key: str, fixture: str = "mailgun_failed_permanent.json", stamp: str = STAMP) -> bytes:
    return mailgun_body(fixture, key, stamp, secrets.token_hex(25))


def test_permanent_failure_is_a_hard_bounce(config: WebhookConfig, key: str) -> None:
    # Given a signed permanent failure / When handled
    events = handle(mailgun, {}, _body(key), config, NOW)
    # Then every field is normalised
    assert events == [
        WebhookEvent(
            provider="mailgun", event_id="ncV2XwymRUKbPek_MIM-Gw", type=EventType.HARD_BOUNCE,
            recipient="nobody@example.org",
            occurred_at=datetime(2024, 1, 1, 0, 0, 2, 389832, tzinfo=UTC),
            message_id="msg-42@example.com",
            diagnostic="550 5.1.1 The email account that you tried to reach does not exist.",
            enhanced_status="5.1.1", policy_rejection=False, raw_type="failed/permanent/bounce",
        )
    ]


def test_temporary_failure_is_a_deferral(config: WebhookConfig, key: str) -> None:
    # Given a signed temporary failure (Mailgun will retry the message)
    events = handle(mailgun, {}, _body(key, "mailgun_failed_temporary.json"), config, NOW)
    # Then it is deferred, never counted as a bounce per retry
    assert events == [
        WebhookEvent(
            provider="mailgun", event_id="Gx9-tRk2T4uGbqZ3aW1mPQ", type=EventType.DEFERRED,
            recipient="slow@example.org", occurred_at=datetime(2024, 1, 1, 0, 0, 3, tzinfo=UTC),
            message_id="msg-46@example.com",
            diagnostic="452 4.2.2 The email account that you tried to reach is over quota.",
            enhanced_status="4.2.2", policy_rejection=False,
            raw_type="failed/temporary/generic",
        )
    ]


@pytest.mark.parametrize(
    ("fixture", "type_", "recipient", "event_id", "when", "message_id", "diagnostic"),
    [
        ("mailgun_complained.json", EventType.COMPLAINT, "angry@example.org",
         "-Agny091SquKnsrW2NEKUA", datetime(2024, 1, 1, 0, 0, 4, 500000, tzinfo=UTC),
         "msg-48@example.com", None),
        ("mailgun_delivered.json", EventType.DELIVERED, "someone@example.org",
         "CPgfbmQMTCKtHW6uIWtuVe", datetime(2024, 1, 1, 0, 0, 5, 250000, tzinfo=UTC),
         "msg-47@example.com", "250 OK"),
        ("mailgun_unsubscribed.json", EventType.UNSUBSCRIBE, "leaver@example.org",
         "Ase7i2zsRYeDXztHGENqRA", datetime(2024, 1, 1, 0, 0, 6, tzinfo=UTC),
         "msg-49@example.com", None),
    ],
)
def test_other_events(
    config: WebhookConfig, key: str, fixture: str, type_: EventType, recipient: str,
    event_id: str, when: datetime, message_id: str, diagnostic: str | None,
) -> None:
    # Given a signed complained/delivered/unsubscribed event / When handled
    [event] = handle(mailgun, {}, _body(key, fixture), config, NOW)
    # Then it is normalised field by field
    assert event == WebhookEvent(
        provider="mailgun", event_id=event_id, type=type_, recipient=recipient,
        occurred_at=when, message_id=message_id, diagnostic=diagnostic, enhanced_status=None,
        policy_rejection=False, raw_type=fixture.removeprefix("mailgun_").removesuffix(".json"),
    )


@pytest.mark.parametrize(
    ("reason", "type_", "policy"),
    [
        ("bounce", EventType.HARD_BOUNCE, False),
        ("suppress-bounce", EventType.HARD_BOUNCE, False),
        ("old", EventType.SOFT_BOUNCE, False),
        ("espblock", EventType.SOFT_BOUNCE, True),
        ("suppress-complaint", EventType.COMPLAINT, False),
        ("suppress-unsubscribe", EventType.UNSUBSCRIBE, False),
    ],
)
def test_permanent_failure_reasons(reason: str, type_: EventType, policy: bool) -> None:
    # Given a verified permanent failure with a given reason
    payload = fixture_json("mailgun_failed_permanent.json")
    payload["event-data"]["reason"] = reason
    # When parsed / Then the reason table decides
    [event] = mailgun.parse({}, json.dumps(payload).encode())
    assert (event.type, event.policy_rejection) == (type_, policy)


def test_policy_status_is_flagged() -> None:
    # Given a permanent failure whose SMTP reply is a 5.7.1 policy rejection
    payload = fixture_json("mailgun_failed_permanent.json")
    payload["event-data"]["delivery-status"]["message"] = "5.7.1 Rejected by DMARC policy"
    # When parsed / Then it stays a hard bounce but is flagged as the sender's problem
    [event] = mailgun.parse({}, json.dumps(payload).encode())
    assert (event.type, event.enhanced_status, event.policy_rejection) == (
        EventType.HARD_BOUNCE, "5.7.1", True,
    )


def test_ignored_events_yield_nothing(config: WebhookConfig, key: str) -> None:
    # Given a signed "opened" event / When parsed / Then there is nothing to act on
    payload = fixture_json("mailgun_delivered.json")
    payload["event-data"]["event"] = "opened"
    assert mailgun.parse({}, json.dumps(payload).encode()) == []


def test_token_is_accepted_only_once(config: WebhookConfig, key: str) -> None:
    # Given a signed request
    body = _body(key)
    # When it is sent twice / Then the first is accepted and the second refused as a replay
    assert handle(mailgun, {}, body, config, NOW)
    with pytest.raises(Replayed):
        handle(mailgun, {}, body, config, NOW + timedelta(seconds=1))


def test_published_vector_verifies() -> None:
    # Given the vector computed for this project, with a token store on its clock
    vector = fixture_json("mailgun_signed_vector.json")
    sent = datetime.fromtimestamp(int(vector["signature"]["timestamp"]), UTC)
    config = WebhookConfig(mailgun_signing_key=vector["signing_key"],
                           seen_tokens=MemorySeenTokens(lambda: sent))
    payload = fixture_json("mailgun_failed_permanent.json")
    payload["signature"] = vector["signature"]
    body = json.dumps(payload).encode()
    # When verified near its timestamp / Then it passes once, and a replay is refused
    mailgun.verify({}, body, config, sent + timedelta(seconds=5))
    with pytest.raises(Replayed):
        mailgun.verify({}, body, config, sent + timedelta(seconds=6))


def test_bit_flip_in_signed_values_fails(config: WebhookConfig, key: str) -> None:
    # Given a signed body / When a bit flips in the signature, token or timestamp
    body = _body(key)
    sig = json.loads(body)["signature"]
    for needle in (sig["signature"], sig["token"], sig["timestamp"]):
        tampered = flip_bit(body, body.index(needle.encode()) + 5)
        # Then verification fails
        with pytest.raises(VerificationFailed):
            handle(mailgun, {}, tampered, config, NOW)


def test_event_data_is_not_covered_by_the_signature(config: WebhookConfig, key: str) -> None:
    # Given a signed body re-serialised, and one with a bit flipped inside event-data
    body = _body(key)
    reserialised = json.dumps(json.loads(body), indent=4).encode()
    altered = flip_bit(body, body.index(b"nobody") + 1)
    # When handled / Then both authenticate: Mailgun signs only timestamp + token, so body
    # integrity rests on HTTPS (documented limitation) while the token still stops replays
    [event] = handle(mailgun, {}, reserialised, config, NOW)
    assert event.recipient == "nobody@example.org"
    with pytest.raises(Replayed):
        handle(mailgun, {}, altered, config, NOW)


def test_wrong_key_fails(config: WebhookConfig) -> None:
    # Given a body signed with another key / When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(mailgun, {}, _body(secrets.token_hex(32)), config, NOW)


@pytest.mark.parametrize("field", ["timestamp", "token", "signature"])
def test_missing_signature_field_fails(config: WebhookConfig, key: str, field: str) -> None:
    # Given a signed body with one signature field removed
    payload = json.loads(_body(key))
    del payload["signature"][field]
    # When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(mailgun, {}, json.dumps(payload).encode(), config, NOW)


def test_missing_signature_block_fails(config: WebhookConfig) -> None:
    # Given an unsigned body / When handled / Then verification fails
    payload = fixture_json("mailgun_delivered.json")
    del payload["signature"]
    with pytest.raises(VerificationFailed):
        handle(mailgun, {}, json.dumps(payload).encode(), config, NOW)


@pytest.mark.parametrize("offset", [301, -301])
def test_stale_or_future_timestamp_is_refused(
    config: WebhookConfig, key: str, offset: int
) -> None:
    # Given a correctly signed body whose timestamp is 301 s away from now
    body = _body(key, stamp=str(int(NOW.timestamp()) + offset))
    # When handled / Then it is refused as a replay
    with pytest.raises(Replayed):
        handle(mailgun, {}, body, config, NOW)


def test_refused_requests_do_not_burn_tokens(config: WebhookConfig, key: str) -> None:
    # Given a request with a wrong signature carrying a token
    token = secrets.token_hex(25)
    forged = mailgun_body("mailgun_delivered.json", "wrong", STAMP, token)
    with pytest.raises(VerificationFailed):
        handle(mailgun, {}, forged, config, NOW)
    # When the genuine request with that token arrives / Then it is accepted
    genuine = mailgun_body("mailgun_delivered.json", key, STAMP, token)
    assert handle(mailgun, {}, genuine, config, NOW)


def test_unconfigured_is_refused(key: str) -> None:
    # Given no signing key / When a request arrives / Then NotConfigured (404)
    with pytest.raises(NotConfigured):
        handle(mailgun, {}, _body(key), WebhookConfig(), NOW)


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"signature": 3}'])
def test_unreadable_body(config: WebhookConfig, payload: bytes) -> None:
    # Given a body that is not a Mailgun object / When handled / Then 400 or 401, never 200
    with pytest.raises((ParseError, VerificationFailed)):
        handle(mailgun, {}, payload, config, NOW)


def test_memory_store_forgets_expired_tokens() -> None:
    # Given a store whose clock moves past a token's expiry
    clock = [NOW]
    store = MemorySeenTokens(lambda: clock[0], max_tokens=2)
    assert store.add_if_new("a", NOW + timedelta(minutes=5))
    assert not store.add_if_new("a", NOW + timedelta(minutes=5))
    clock[0] = NOW + timedelta(minutes=6)
    # When more tokens arrive than it may hold / Then expired ones are purged first
    assert store.add_if_new("b", clock[0] + timedelta(minutes=5))
    assert store.add_if_new("c", clock[0] + timedelta(minutes=5))
    assert len(store) <= 2
    assert not store.add_if_new("c", clock[0] + timedelta(minutes=5))


def test_event_without_id_is_identified_by_its_signature_token(
    config: WebhookConfig, key: str
) -> None:
    # Given a signed permanent failure whose event-data has no "id"
    token = secrets.token_hex(25)
    payload = json.loads(mailgun_body("mailgun_failed_permanent.json", key, STAMP, token))
    del payload["event-data"]["id"]
    # When handled
    [event] = handle(mailgun, {}, json.dumps(payload).encode(), config, NOW)
    # Then it is accepted, its id being the one-time signature token (SPEC 8)
    assert (event.event_id, event.type) == (token, EventType.HARD_BOUNCE)
