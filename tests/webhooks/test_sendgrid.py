"""SendGrid: ECDSA P-256 over timestamp + raw body, 5-minute window, events mapped."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mailer.errors import ConfigError
from mailer.reports.vocabulary import EventType, WebhookEvent
from mailer.webhooks import handle, sendgrid
from mailer.webhooks._support.config import WebhookConfig, load_sendgrid_key
from mailer.webhooks._support.errors import NotConfigured, ParseError, Replayed, VerificationFailed
from tests.webhooks.conftest import NOW
from tests.webhooks.signing import (
    fixture_bytes,
    fixture_json,
    flip_bit,
    sendgrid_headers,
    sendgrid_key_text,
)

STAMP = str(int(NOW.timestamp()))
T0 = datetime(2024, 1, 1, 0, 0, 10, tzinfo=UTC)


@pytest.fixture()
def config(ec_key: ec.EllipticCurvePrivateKey) -> WebhookConfig:
    """Given SendGrid configured with the key as its console shows it (base64 DER)."""
    return WebhookConfig.from_mapping({"sendgrid_public_key": sendgrid_key_text(ec_key)})


@pytest.fixture()
def body() -> bytes:
    """The batch of SendGrid events, byte for byte as stored."""
    return fixture_bytes("sendgrid_events.json")


def _event(n: int, **fields: Any) -> WebhookEvent:
    return WebhookEvent(provider="sendgrid", occurred_at=T0 + timedelta(seconds=n), **fields)


def test_valid_batch_maps_every_event(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, body: bytes
) -> None:
    # Given a signed batch of eleven events
    headers = sendgrid_headers(ec_key, STAMP, body)
    # When handled
    events = handle(sendgrid, headers, body, config, NOW)
    # Then the nine that matter are normalised; "Spam Content" drops, processed and open
    # events are not outcomes and are left out
    assert events == [
        _event(0, event_id="Ym91bmNlLTAtMTIzNDU2Nzg5", type=EventType.HARD_BOUNCE,
               recipient="nobody@example.org", message_id="msg-42@example.com",
               diagnostic="550 5.1.1 The email account that you tried to reach does not exist.",
               enhanced_status="5.1.1", policy_rejection=False, raw_type="bounce/bounce"),
        _event(1, event_id="YmxvY2tlZC0xLTk4NzY1", type=EventType.SOFT_BOUNCE,
               recipient="blocked@example.net", message_id="msg-43@example.com",
               diagnostic="550 5.7.1 Service unavailable; client host blocked using RBL",
               enhanced_status="5.7.1", policy_rejection=True, raw_type="bounce/blocked"),
        _event(2, event_id="ZHJvcC0yLTExMTEx", type=EventType.HARD_BOUNCE,
               recipient="gone@example.org", message_id="msg-44@example.com",
               diagnostic="Bounced Address", enhanced_status=None, policy_rejection=False,
               raw_type="dropped"),
        _event(4, event_id="ZGVmZXJyZWQtNC0zMzMz", type=EventType.DEFERRED,
               recipient="slow@example.org", message_id="msg-46@example.com",
               diagnostic="400 4.2.2 Mailbox full, try again later", enhanced_status="4.2.2",
               policy_rejection=False, raw_type="deferred"),
        _event(5, event_id="ZGVsaXZlcmVkLTUtNDQ0NA", type=EventType.DELIVERED,
               recipient="someone@example.org", message_id="msg-47@example.com",
               diagnostic="250 2.0.0 OK 1704067215 queued", enhanced_status="2.0.0",
               policy_rejection=False, raw_type="delivered"),
        _event(6, event_id="c3BhbXJlcG9ydC02LTU1NTU", type=EventType.COMPLAINT,
               recipient="angry@example.org", message_id=None, diagnostic=None,
               enhanced_status=None, policy_rejection=False, raw_type="spamreport"),
        _event(7, event_id="dW5zdWJzY3JpYmUtNy02NjY2", type=EventType.UNSUBSCRIBE,
               recipient="leaver@example.org", message_id=None, diagnostic=None,
               enhanced_status=None, policy_rejection=False, raw_type="unsubscribe"),
        _event(8, event_id="Z3JvdXAtOC03Nzc3", type=EventType.UNSUBSCRIBE,
               recipient="leaver2@example.org", message_id=None, diagnostic=None,
               enhanced_status=None, policy_rejection=False, raw_type="group_unsubscribe"),
    ]


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("Bounced Address", EventType.HARD_BOUNCE),
        ("Invalid", EventType.HARD_BOUNCE),
        ("Spam Reporting Address", EventType.COMPLAINT),
        ("Unsubscribed Address", EventType.UNSUBSCRIBE),
        ("Spam Content (if spam checker app is enabled)", None),
        ("Invalid SMTPAPI header", None),
    ],
)
def test_dropped_reasons(reason: str, expected: EventType | None) -> None:
    # Given a verified dropped event with a given reason
    item = {"email": "a@example.org", "timestamp": 1704067210, "event": "dropped",
            "sg_event_id": "x", "reason": reason}
    # When parsed / Then only SendGrid's own address lists become events
    events = sendgrid.parse({}, json.dumps([item]).encode())
    assert [e.type for e in events] == ([expected] if expected else [])


def test_missing_sg_event_id_gets_a_stable_id() -> None:
    # Given an event without sg_event_id / When parsed twice
    body = json.dumps([{"email": "a@example.org", "timestamp": 1704067210,
                        "event": "spamreport", "sg_message_id": "m1"}]).encode()
    first, second = sendgrid.parse({}, body), sendgrid.parse({}, body)
    # Then it has a sha256 id, identical both times
    assert len(first[0].event_id) == 64 and first[0].event_id == second[0].event_id


def test_same_body_twice_verifies_with_stable_event_ids(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, body: bytes
) -> None:
    # Given a signed batch delivered twice (SendGrid retries)
    headers = sendgrid_headers(ec_key, STAMP, body)
    # When handled twice / Then both verify and carry the same event ids for the caller
    first = handle(sendgrid, headers, body, config, NOW)
    second = handle(sendgrid, headers, body, config, NOW + timedelta(seconds=10))
    assert [e.event_id for e in first] == [e.event_id for e in second]


@pytest.mark.parametrize("index", [0, 1, 100, 400, -3, -1])
def test_bit_flipped_body_fails(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, body: bytes, index: int
) -> None:
    # Given a signed body with one bit flipped after signing
    headers = sendgrid_headers(ec_key, STAMP, body)
    # When handled / Then verification fails, whatever the byte
    with pytest.raises(VerificationFailed):
        handle(sendgrid, headers, flip_bit(body, index), config, NOW)


def test_wrong_key_fails(
    config: WebhookConfig, other_ec_key: ec.EllipticCurvePrivateKey, body: bytes
) -> None:
    # Given a body signed by another key / When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(sendgrid, sendgrid_headers(other_ec_key, STAMP, body), body, config, NOW)


@pytest.mark.parametrize("missing", [sendgrid.SIGNATURE_HEADER, sendgrid.TIMESTAMP_HEADER])
def test_missing_header_fails(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, body: bytes, missing: str
) -> None:
    # Given a signed body with one of the two headers missing
    headers = sendgrid_headers(ec_key, STAMP, body)
    del headers[missing]
    # When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(sendgrid, headers, body, config, NOW)


def test_headers_are_matched_case_insensitively(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, body: bytes
) -> None:
    # Given the headers lower-cased as an ASGI server delivers them
    headers = {k.lower(): v for k, v in sendgrid_headers(ec_key, STAMP, body).items()}
    # When handled / Then it verifies
    assert handle(sendgrid, headers, body, config, NOW)


def test_garbage_signature_fails(config: WebhookConfig, body: bytes) -> None:
    # Given a signature header that is not base64 DER / When handled / Then it fails
    headers = {sendgrid.SIGNATURE_HEADER: "%%%", sendgrid.TIMESTAMP_HEADER: STAMP}
    with pytest.raises(VerificationFailed):
        handle(sendgrid, headers, body, config, NOW)
    headers[sendgrid.SIGNATURE_HEADER] = base64.b64encode(b"not DER").decode()
    with pytest.raises(VerificationFailed):
        handle(sendgrid, headers, body, config, NOW)


@pytest.mark.parametrize("offset", [301, -301, 86400])
def test_stale_or_future_timestamp_is_replay(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, body: bytes, offset: int
) -> None:
    # Given a body correctly signed with a timestamp 301 s (or a day) away from now
    headers = sendgrid_headers(ec_key, str(int(NOW.timestamp()) + offset), body)
    # When handled / Then it is refused as a replay
    with pytest.raises(Replayed):
        handle(sendgrid, headers, body, config, NOW)


def test_timestamp_within_window_is_accepted(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, body: bytes
) -> None:
    # Given a signature 300 s old / When handled / Then it is still accepted
    headers = sendgrid_headers(ec_key, str(int(NOW.timestamp()) - 300), body)
    assert handle(sendgrid, headers, body, config, NOW)


def test_reserialised_json_fails(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, body: bytes
) -> None:
    # Given a signed body that a proxy re-serialised with other spacing
    headers = sendgrid_headers(ec_key, STAMP, body)
    reserialised = json.dumps(json.loads(body), separators=(",", ":")).encode()
    # When handled / Then verification fails: only the raw bytes are signed
    with pytest.raises(VerificationFailed):
        handle(sendgrid, headers, reserialised, config, NOW)


def test_published_vectors_verify() -> None:
    # Given SendGrid's SDK test vectors
    vectors = fixture_json("sendgrid_signed_vectors.json")
    for vector in vectors[:2]:
        config = WebhookConfig(sendgrid_public_key=load_sendgrid_key(vector["public_key_b64_der"]))
        headers = {sendgrid.SIGNATURE_HEADER: vector["signature_b64"],
                   sendgrid.TIMESTAMP_HEADER: vector["timestamp"]}
        now = datetime.fromtimestamp(int(vector["timestamp"]) + 30, UTC)
        body = vector["raw_body"].encode()
        # When verified near their timestamp / Then they pass
        sendgrid.verify(headers, body, config, now)
        # And with the trailing CRLF stripped, or a day later, they do not
        with pytest.raises(VerificationFailed):
            sendgrid.verify(headers, body.rstrip(b"\r\n") + b" ", config, now)
        with pytest.raises(Replayed):
            sendgrid.verify(headers, body, config, now + timedelta(days=1))
    # Given the published bad signature and bad key / Then both fail on the first vector
    good, bad = vectors[0], vectors[2]
    body = good["raw_body"].encode()
    now = datetime.fromtimestamp(int(good["timestamp"]), UTC)
    config = WebhookConfig(sendgrid_public_key=load_sendgrid_key(good["public_key_b64_der"]))
    with pytest.raises(VerificationFailed):
        sendgrid.verify({sendgrid.SIGNATURE_HEADER: bad["bad_signature_b64"],
                         sendgrid.TIMESTAMP_HEADER: good["timestamp"]}, body, config, now)
    config = WebhookConfig(sendgrid_public_key=load_sendgrid_key(bad["bad_public_key_b64_der"]))
    with pytest.raises(VerificationFailed):
        sendgrid.verify({sendgrid.SIGNATURE_HEADER: good["signature_b64"],
                         sendgrid.TIMESTAMP_HEADER: good["timestamp"]}, body, config, now)


def test_published_vector_parses() -> None:
    # Given the second published vector, a real dropped event / When parsed
    vector = fixture_json("sendgrid_signed_vectors.json")[1]
    [event] = sendgrid.parse({}, vector["raw_body"].encode())
    # Then it is a hard bounce (SendGrid's bounce list) with SendGrid's smtp-id
    assert event == WebhookEvent(
        provider="sendgrid", event_id="ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
        type=EventType.HARD_BOUNCE, recipient="hello@world.com",
        occurred_at=datetime.fromtimestamp(1600112492, UTC),
        message_id="LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net",
        diagnostic="Bounced Address", enhanced_status=None, policy_rejection=False,
        raw_type="dropped",
    )


def test_pem_key_is_accepted(ec_key: ec.EllipticCurvePrivateKey) -> None:
    # Given the key pasted as PEM / When loaded / Then it is the same key
    from cryptography.hazmat.primitives import serialization

    pem = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert load_sendgrid_key(pem).public_numbers() == ec_key.public_key().public_numbers()


@pytest.mark.parametrize("text", ["not a key", "QUJD", "-----BEGIN PUBLIC KEY-----\nx\n"])
def test_malformed_key_is_a_config_error(text: str) -> None:
    # Given a malformed MAILER_SENDGRID_PUBLIC_KEY / When loaded / Then ConfigError at startup
    with pytest.raises(ConfigError):
        load_sendgrid_key(text)


def test_non_p256_key_is_a_config_error() -> None:
    # Given a P-384 key / When loaded / Then ConfigError: SendGrid only uses P-256
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError):
        load_sendgrid_key(sendgrid_key_text(key))


def test_unconfigured_is_refused(ec_key: ec.EllipticCurvePrivateKey, body: bytes) -> None:
    # Given no key configured / When a request arrives / Then NotConfigured (404)
    with pytest.raises(NotConfigured):
        handle(sendgrid, sendgrid_headers(ec_key, STAMP, body), body, WebhookConfig(), NOW)


@pytest.mark.parametrize(
    "payload", [b"{}", b"[1]", b'[{"event": "bounce"}]', b"not json", b'[{"event": 3}]']
)
def test_malformed_authentic_body_is_a_parse_error(
    config: WebhookConfig, ec_key: ec.EllipticCurvePrivateKey, payload: bytes
) -> None:
    # Given a correctly signed body of the wrong shape / When handled / Then ParseError (400)
    with pytest.raises(ParseError):
        handle(sendgrid, sendgrid_headers(ec_key, STAMP, payload), payload, config, NOW)
