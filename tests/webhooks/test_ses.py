"""SES via SNS: SNS signature checks first, then SES events mapped field by field."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mailer.reports.vocabulary import EventType, WebhookEvent
from mailer.webhooks import handle, ses
from mailer.webhooks._support import sns
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import (
    BodyTooLarge,
    CertificateUnavailable,
    NotConfigured,
    ParseError,
    Replayed,
    VerificationFailed,
)
from tests.webhooks.conftest import NOW
from tests.webhooks.signing import fixture_json, flip_bit, self_signed_cert, sign_sns

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
CERT_URL = (
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem"
)
SNS_ID = "6d1b2c3a-4e5f-5a6b-9c8d-7e6f5a4b3c2d"
HEADERS = {"x-amz-sns-message-type": "Notification", "Content-Type": "text/plain; charset=UTF-8"}


def _no_fetch(url: str) -> bytes:
    pytest.fail(f"certificate fetch attempted for {url}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given no socket may connect anywhere during these tests."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail("network connection attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture()
def cert_dir(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    """Given the SNS certificate pre-provisioned in MAILER_SNS_CERT_DIR."""
    (tmp_path / CERT_URL.rsplit("/", 1)[1]).write_bytes(self_signed_cert(rsa_key))
    return tmp_path


@pytest.fixture()
def config(cert_dir: Path) -> WebhookConfig:
    """Given SES configured for one topic, with network fetching forbidden."""
    return WebhookConfig(ses_topic_arns=frozenset({TOPIC}), sns_cert_dir=cert_dir,
                         fetch_cert=_no_fetch)


def envelope(ses_fixture: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Return the SNS envelope fixture carrying an SES event fixture as its Message string."""
    env: dict[str, Any] = fixture_json("sns_notification.json")
    if ses_fixture is not None:
        env["Message"] = json.dumps(fixture_json(ses_fixture))
    env.update(overrides)
    return env


def handled(body: bytes, config: WebhookConfig, now: datetime = NOW) -> list[WebhookEvent]:
    """Handle a Notification body and return its events (never a subscription)."""
    result = handle(ses, HEADERS, body, config, now)
    assert isinstance(result, list)
    return result


def signed(key: rsa.RSAPrivateKey, ses_fixture: str = "ses_bounce.json", **overrides: Any) -> bytes:
    """Return the body SNS would POST, signed with ``key``."""
    return sign_sns(envelope(ses_fixture, **overrides), key)


# --- valid messages: every normalised field ---------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
def test_permanent_bounce_gives_one_hard_bounce_per_recipient(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey, version: str
) -> None:
    # Given a Permanent bounce for two recipients, signed with SignatureVersion 1 or 2
    body = signed(rsa_key, SignatureVersion=version)
    # When it is handled
    events = handle(ses, HEADERS, body, config, NOW)
    # Then each recipient gets a hard bounce; the 5.7.1 one is flagged as policy
    when = datetime(2024, 1, 1, 0, 0, 2, 500000, tzinfo=UTC)
    assert events == [
        WebhookEvent(
            provider="ses", event_id=f"{SNS_ID}:nobody@example.org",
            type=EventType.HARD_BOUNCE, recipient="nobody@example.org", occurred_at=when,
            message_id="msg-42@example.com",
            diagnostic="smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected: "
            "User unknown",
            enhanced_status="5.1.1", policy_rejection=False, raw_type="Bounce/Permanent/General",
        ),
        WebhookEvent(
            provider="ses", event_id=f"{SNS_ID}:blocked@example.net",
            type=EventType.HARD_BOUNCE, recipient="blocked@example.net", occurred_at=when,
            message_id="msg-42@example.com",
            diagnostic="smtp; 550 5.7.1 Message rejected due to local policy",
            enhanced_status="5.7.1", policy_rejection=True, raw_type="Bounce/Permanent/General",
        ),
    ]


def test_transient_bounce_is_soft(config: WebhookConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    # Given a Transient/MailboxFull bounce
    body = signed(rsa_key, "ses_bounce_transient.json")
    # When handled / Then it is one soft bounce with the 5.2.2 status
    assert handle(ses, HEADERS, body, config, NOW) == [
        WebhookEvent(
            provider="ses", event_id=f"{SNS_ID}:full@example.org", type=EventType.SOFT_BOUNCE,
            recipient="full@example.org", occurred_at=datetime(2024, 1, 1, 0, 0, 3, tzinfo=UTC),
            message_id="msg-42@example.com", diagnostic="smtp; 552 5.2.2 Mailbox full",
            enhanced_status="5.2.2", policy_rejection=False,
            raw_type="Bounce/Transient/MailboxFull",
        )
    ]


def test_complaint(config: WebhookConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    # Given an SES complaint relayed from an ISP feedback loop, an hour after sending
    body = signed(rsa_key, "ses_complaint.json", Timestamp="2024-01-01T01:00:01.000Z")
    # When handled an hour later still
    events = handled(body, config, NOW + timedelta(hours=1))
    # Then there is one complaint for the complaining recipient
    assert events == [
        WebhookEvent(
            provider="ses", event_id=f"{SNS_ID}:user@isp.example", type=EventType.COMPLAINT,
            recipient="user@isp.example", occurred_at=datetime(2024, 1, 1, 1, tzinfo=UTC),
            message_id="msg-42@example.com", diagnostic=None, enhanced_status=None,
            policy_rejection=False, raw_type="Complaint",
        )
    ]


def test_not_spam_feedback_is_no_complaint(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a complaint notification whose ARF feedback type is "not-spam" (RFC 6430)
    message = fixture_json("ses_complaint.json")
    message["complaint"]["complaintFeedbackType"] = "not-spam"
    body = sign_sns(envelope(Message=json.dumps(message)), rsa_key)
    # When handled / Then nothing is reported
    assert handle(ses, HEADERS, body, config, NOW) == []


def test_delivery(config: WebhookConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    # Given a Delivery notification
    body = signed(rsa_key, "ses_delivery.json")
    # When handled / Then one delivered event carries the receiver's reply
    assert handle(ses, HEADERS, body, config, NOW) == [
        WebhookEvent(
            provider="ses", event_id=f"{SNS_ID}:someone@example.org", type=EventType.DELIVERED,
            recipient="someone@example.org",
            occurred_at=datetime(2024, 1, 1, 0, 0, 1, 200000, tzinfo=UTC),
            message_id="msg-42@example.com", diagnostic="250 2.0.0 OK 1704067201 queued",
            enhanced_status="2.0.0", policy_rejection=False, raw_type="Delivery",
        )
    ]


def test_delivery_delay_is_deferred(config: WebhookConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    # Given an event-publishing DeliveryDelay (field "eventType", not "notificationType")
    body = signed(rsa_key, "ses_delivery_delay.json", Timestamp="2024-01-01T00:15:41.000Z")
    # When handled ten minutes later
    events = handled(body, config, NOW + timedelta(minutes=11))
    # Then it is a deferral, not a bounce
    assert events == [
        WebhookEvent(
            provider="ses", event_id=f"{SNS_ID}:slow@example.org", type=EventType.DEFERRED,
            recipient="slow@example.org",
            occurred_at=datetime(2024, 1, 1, 0, 15, 40, 641000, tzinfo=UTC),
            message_id="msg-42@example.com",
            diagnostic="smtp; 421 4.4.1 Unable to connect to remote host",
            enhanced_status="4.4.1", policy_rejection=False,
            raw_type="DeliveryDelay/TransientCommunicationFailure",
        )
    ]


def test_message_id_falls_back_to_common_headers(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a notification without the original header list
    message = fixture_json("ses_complaint.json")
    del message["mail"]["headers"]
    body = sign_sns(envelope(Message=json.dumps(message)), rsa_key)
    # When handled / Then our Message-ID is still found, without brackets
    [event] = handled(body, config)
    assert event.message_id == "msg-42@example.com"


def test_subscription_confirmation_is_returned_not_visited(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a signed SubscriptionConfirmation (SignatureVersion 1, the topic default)
    env = fixture_json("sns_subscription_confirmation.json")
    body = sign_sns(env, rsa_key)
    # When handled
    result = handle(
        ses, {"x-amz-sns-message-type": "SubscriptionConfirmation"}, body, config, NOW
    )
    # Then the caller gets what it needs to record it (and no connection was made)
    assert result == ses.SnsSubscription(
        kind="SubscriptionConfirmation", topic_arn=TOPIC, subscribe_url=env["SubscribeURL"],
        message_id=env["MessageId"],
    )


def test_plain_text_notice_and_other_event_types_are_ignored(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given SES's plain-text "topic validated" notice and an Open event
    notice = sign_sns(envelope(Message="Successfully validated SNS topic for Amazon SES."),
                      rsa_key)
    opened = sign_sns(envelope(Message=json.dumps({"eventType": "Open", "mail": {}})), rsa_key)
    # When handled / Then both are accepted and yield nothing
    assert handle(ses, HEADERS, notice, config, NOW) == []
    assert handle(ses, HEADERS, opened, config, NOW) == []


def test_replayed_body_verifies_again_with_the_same_event_ids(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a body SNS retries (same MessageId)
    body = signed(rsa_key)
    # When it arrives twice
    first = handled(body, config)
    second = handled(body, config, NOW + timedelta(seconds=30))
    # Then both verify and the caller's idempotency sees identical event ids
    assert [e.event_id for e in first] == [e.event_id for e in second]


# --- rejected messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "needle", [b"nobody@example.org", SNS_ID.encode(), b"00:05:00.000Z", b"Amazon SES Email"]
)
def test_bit_flip_in_a_signed_field_fails(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey, needle: bytes
) -> None:
    # Given a valid body with one bit flipped inside Message, MessageId, Timestamp or Subject
    body = signed(rsa_key)
    tampered = flip_bit(body, body.index(needle) + 2)
    # When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, tampered, config, NOW)


def test_bit_flip_in_the_signature_fails(config: WebhookConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    # Given a valid envelope whose Signature has one bit flipped (still base64)
    env = json.loads(signed(rsa_key))
    sig = env["Signature"]
    env["Signature"] = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    # When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, json.dumps(env).encode(), config, NOW)


def test_wrong_key_fails(config: WebhookConfig, other_rsa_key: rsa.RSAPrivateKey) -> None:
    # Given a body signed by a key that is not the certificate's
    body = signed(other_rsa_key)
    # When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, body, config, NOW)


@pytest.mark.parametrize("field", ["Signature", "SigningCertURL", "SignatureVersion", "Message",
                                   "Timestamp", "TopicArn"])
def test_missing_field_fails(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey, field: str
) -> None:
    # Given a valid body with one signing field removed
    env = json.loads(signed(rsa_key))
    del env[field]
    # When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, json.dumps(env).encode(), config, NOW)


def test_unknown_signature_version_fails(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a message claiming a SignatureVersion this code does not know
    env = json.loads(signed(rsa_key))
    env["SignatureVersion"] = "3"
    # When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, json.dumps(env).encode(), config, NOW)


def test_reserialised_inner_message_fails(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a valid envelope whose Message JSON string is re-serialised with other spacing
    env = json.loads(signed(rsa_key))
    env["Message"] = json.dumps(json.loads(env["Message"]), indent=1)
    # When handled / Then verification fails: the Message text is signed as sent
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, json.dumps(env).encode(), config, NOW)


def test_reserialised_envelope_still_verifies(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a valid envelope re-serialised compactly: SNS signs field values, not bytes
    body = signed(rsa_key)
    compact = json.dumps(json.loads(body), separators=(",", ":")).encode()
    # When handled / Then it verifies and yields the same events
    assert handle(ses, HEADERS, compact, config, NOW) == handle(
        ses, HEADERS, body, config, NOW
    )


def test_timestamp_window(config: WebhookConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    # Given a valid body timestamped at 00:05:00
    body = signed(rsa_key)
    # When handled 301 s later / Then it is accepted: SNS retries keep the first Timestamp
    assert handle(ses, HEADERS, body, config, NOW + timedelta(seconds=301))
    # When handled after the retry ceiling (1 h + 5 min skew) / Then it is refused
    with pytest.raises(Replayed):
        late = NOW + sns.MAX_AGE + sns.MAX_SKEW + timedelta(seconds=1)
        handle(ses, HEADERS, body, config, late)
    # When handled 301 s before its Timestamp / Then it is refused as from the future
    with pytest.raises(Replayed):
        handle(ses, HEADERS, body, config, NOW - timedelta(seconds=301))


def test_unknown_topic_is_refused_before_any_certificate_lookup(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given a correctly signed message for a topic we did not configure
    config = WebhookConfig(ses_topic_arns=frozenset({TOPIC}), sns_cert_dir=tmp_path,
                           fetch_cert=_no_fetch)
    body = signed(rsa_key, TopicArn="arn:aws:sns:us-east-1:999999999999:someone-else")
    # When handled / Then it is refused without fetching a certificate
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, body, config, NOW)


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000000000000000000000.pem",
        "https://evil.example/SimpleNotificationService-0000000000000000000000.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example/SimpleNotificationService-0.pem",
        "https://sns.us-east-1.amazonaws.com@evil.example/SimpleNotificationService-0.pem",
        "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-0.pem",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0.pem?x=1",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0.pem#x",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0.crt",
        "https://sns.us-east-1.amazonaws.com/",
        "https://sns.us-east-1.amazonaws.com/..pem",
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-0.pem",
        "https://sqs.us-east-1.amazonaws.com/SimpleNotificationService-0.pem",
        "https://sns.x.amazonaws.com/SimpleNotificationService-0.pem",
        "file:///etc/SimpleNotificationService-0.pem",
        "",
    ],
)
def test_bad_certificate_url_is_refused_without_network(
    config: WebhookConfig, rsa_key: rsa.RSAPrivateKey, url: str
) -> None:
    # Given an otherwise valid message pointing at a certificate URL that is not SNS's
    body = signed(rsa_key, SigningCertURL=url)
    # When handled / Then it is refused, and neither fetch_cert nor a socket was touched
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, body, config, NOW)


def test_default_fetcher_refuses_unchecked_urls_itself() -> None:
    # Given the default certificate fetcher / When asked for an http URL
    # Then it refuses before connecting (the autouse fixture fails any socket use)
    with pytest.raises(VerificationFailed):
        sns.fetch_certificate("http://sns.us-east-1.amazonaws.com/x.pem")


def test_certificate_not_provisioned_is_fetched_through_the_injected_fetcher(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    # Given an empty cert dir and a fetcher that serves the certificate
    asked: list[str] = []

    def fetch(url: str) -> bytes:
        asked.append(url)
        return self_signed_cert(rsa_key)

    config = WebhookConfig(ses_topic_arns=frozenset({TOPIC}), sns_cert_dir=tmp_path,
                           fetch_cert=fetch)
    # When a valid message is handled
    events = handled(signed(rsa_key), config)
    # Then the fetcher was asked for exactly the checked URL and the message verified
    assert asked == [CERT_URL]
    assert len(events) == 2


def test_unavailable_certificate_is_a_retryable_error(rsa_key: rsa.RSAPrivateKey) -> None:
    # Given no provisioned certificate and a fetcher that cannot reach AWS
    def fetch(url: str) -> bytes:
        raise CertificateUnavailable("offline")

    config = WebhookConfig(ses_topic_arns=frozenset({TOPIC}), fetch_cert=fetch)
    # When a valid message is handled / Then the caller gets a 503-class error so SNS retries
    with pytest.raises(CertificateUnavailable) as caught:
        handle(ses, HEADERS, signed(rsa_key), config, NOW)
    assert caught.value.status == 503


def test_garbage_certificate_fails(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    # Given a cert dir file that is not a certificate
    (tmp_path / CERT_URL.rsplit("/", 1)[1]).write_bytes(b"not a certificate")
    config = WebhookConfig(ses_topic_arns=frozenset({TOPIC}), sns_cert_dir=tmp_path,
                           fetch_cert=_no_fetch)
    # When handled / Then verification fails
    with pytest.raises(VerificationFailed):
        handle(ses, HEADERS, signed(rsa_key), config, NOW)


def test_not_json_is_a_parse_error(config: WebhookConfig) -> None:
    # Given a body that is not JSON / When handled / Then it is a 400, not a 401
    with pytest.raises(ParseError):
        handle(ses, HEADERS, b"Type=Notification", config, NOW)


def test_unconfigured_source_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    # Given no MAILER_SES_TOPIC_ARNS / When a message arrives / Then NotConfigured (404)
    with pytest.raises(NotConfigured):
        handle(ses, HEADERS, signed(rsa_key), WebhookConfig(fetch_cert=_no_fetch), NOW)


def test_oversized_body_is_refused_before_verification(config: WebhookConfig) -> None:
    # Given a body over the limit / When handled / Then BodyTooLarge, nothing parsed
    with pytest.raises(BodyTooLarge):
        handle(ses, HEADERS, b" " * (ses.MAX_BODY + 1), config, NOW)


def test_certificate_file_name_comes_from_the_last_path_segment() -> None:
    # Given an SNS certificate URL / When checked / Then its last segment names the file
    assert sns.cert_file_name(CERT_URL) == "SimpleNotificationService-0000000000000000000000.pem"


def test_certificate_download_that_drips_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a certificate host that sends one byte every 50 ms, each in time for the
    # per-step socket timeout, and a 0.3 s deadline for the whole download
    class Drip:
        def __enter__(self) -> Drip:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read1(self, size: int) -> bytes:
            time.sleep(0.05)
            return b"x"

    class Opener:
        def open(self, url: str, timeout: float) -> Drip:
            return Drip()

    monkeypatch.setattr(sns.urllib.request, "build_opener", lambda *handlers: Opener())
    monkeypatch.setattr(sns, "FETCH_DEADLINE", 0.3)
    sns.fetch_certificate.cache_clear()
    # When the certificate is fetched / Then it gives up at the deadline: 503, not hours
    started = time.monotonic()
    with pytest.raises(CertificateUnavailable):
        sns.fetch_certificate(CERT_URL)
    assert time.monotonic() - started < 2
