"""The registry and configuration: which sources exist, which are configured, limits."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mailer.config import Settings
from mailer.errors import ConfigError
from mailer.webhooks import (
    MAX_BODY,
    MAX_DSN_BODY,
    PROVIDERS,
    MemorySeenTokens,
    NotConfigured,
    WebhookConfig,
    body_limit,
    handle,
    mailgun,
    source,
)
from mailer.webhooks._support.errors import (
    BodyTooLarge,
    CertificateUnavailable,
    ParseError,
    Replayed,
    VerificationFailed,
    WebhookError,
)
from tests.webhooks.signing import sendgrid_key_text


def test_every_source_offers_a_body_limit_verify_and_parse() -> None:
    # Given the registry / Then it holds the five sources, each with what handle() calls
    assert set(PROVIDERS) == {"ses", "sendgrid", "mailgun", "postmark", "dsn"}
    for module in PROVIDERS.values():
        assert callable(module.verify) and callable(module.parse)
        assert 0 < module.MAX_BODY <= 5 * 1024 * 1024


def test_handle_verifies_before_it_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a provider whose verification fails and whose parser records being called
    calls: list[str] = []

    def refuse(*args: object) -> None:
        calls.append("verify")
        raise VerificationFailed("no")

    monkeypatch.setattr(mailgun, "verify", refuse)
    monkeypatch.setattr(mailgun, "parse", lambda *a: calls.append("parse"))
    # When a body is handled / Then verification failed and the parser never ran
    with pytest.raises(VerificationFailed):
        handle(mailgun, {}, b"{}", WebhookConfig(mailgun_signing_key="k"), datetime.now(UTC))
    assert calls == ["verify"]
    # And an oversized body is refused before verification is even tried
    calls.clear()
    with pytest.raises(BodyTooLarge):
        handle(mailgun, {}, b"x" * (mailgun.MAX_BODY + 1), WebhookConfig(), datetime.now(UTC))
    assert calls == []


def test_config_from_settings(ec_key: ec.EllipticCurvePrivateKey) -> None:
    # Given every webhook variable in the environment
    settings = Settings.from_environ({
        "MAILER_ENV": "test",
        "MAILER_SENDGRID_PUBLIC_KEY": sendgrid_key_text(ec_key),
        "MAILER_MAILGUN_SIGNING_KEY": "mg-key",
        "MAILER_POSTMARK_WEBHOOK_USER": "pm-user",
        "MAILER_POSTMARK_WEBHOOK_PASSWORD": "pm-pass",
        "MAILER_DSN_WEBHOOK_TOKEN": "dsn-token",
        "MAILER_SES_TOPIC_ARNS": "arn:aws:sns:us-east-1:1:a, arn:aws:sns:eu-west-1:1:b,",
        "MAILER_SNS_CERT_DIR": "/etc/mailer/sns",
    })
    store = MemorySeenTokens()
    # When the webhook config is built
    config = WebhookConfig.from_settings(settings, seen_tokens=store)
    # Then every value is typed and in place
    assert config.sendgrid_public_key is not None
    assert config.sendgrid_public_key.public_numbers() == ec_key.public_key().public_numbers()
    assert (config.mailgun_signing_key, config.postmark_user, config.postmark_password,
            config.dsn_token) == ("mg-key", "pm-user", "pm-pass", "dsn-token")
    assert config.ses_topic_arns == {"arn:aws:sns:us-east-1:1:a", "arn:aws:sns:eu-west-1:1:b"}
    assert str(config.sns_cert_dir) == "/etc/mailer/sns"
    assert config.seen_tokens is store
    assert config.configured() == set(PROVIDERS)
    # And no secret shows in its repr
    for secret in ("mg-key", "pm-pass", "dsn-token"):
        assert secret not in repr(config)


def test_nothing_configured_refuses_every_source() -> None:
    # Given no webhook variables / When any source is asked for / Then NotConfigured (404)
    config = WebhookConfig.from_mapping({})
    assert config.configured() == frozenset()
    for name in PROVIDERS:
        with pytest.raises(NotConfigured):
            source(name, config)


def test_unknown_source_is_not_configured() -> None:
    # Given a name that is no source / When asked for / Then NotConfigured (404)
    with pytest.raises(NotConfigured):
        source("mandrill", WebhookConfig(dsn_token="t"))


def test_configured_source_is_returned() -> None:
    # Given only the DSN token / When asked for "dsn" / Then the dsn module comes back
    assert source("dsn", WebhookConfig(dsn_token="t")) is PROVIDERS["dsn"]


def test_half_configured_postmark_is_not_configured() -> None:
    # Given a Postmark user without a password / Then Postmark is not configured
    assert "postmark" not in WebhookConfig.from_mapping({"postmark_webhook_user": "u"}).configured()


def test_bad_sendgrid_key_fails_at_startup() -> None:
    # Given a malformed key / When the config is built / Then ConfigError, not a 401 later
    with pytest.raises(ConfigError):
        WebhookConfig.from_mapping({"sendgrid_public_key": base64.b64encode(b"junk").decode()})


def test_body_limits() -> None:
    # Given the sources / Then DSN reports may be 5 MiB, JSON webhooks 1 MiB
    assert (MAX_BODY, MAX_DSN_BODY) == (1024 * 1024, 5 * 1024 * 1024)
    assert body_limit("dsn") == MAX_DSN_BODY
    assert all(body_limit(name) == MAX_BODY for name in PROVIDERS if name != "dsn")


def test_error_statuses() -> None:
    # Given the error tree / Then each carries the HTTP status the caller answers with
    assert issubclass(Replayed, VerificationFailed) and issubclass(BodyTooLarge, ParseError)
    assert all(issubclass(e, WebhookError) for e in (NotConfigured, CertificateUnavailable))
    assert [e.status for e in (VerificationFailed, Replayed, ParseError, BodyTooLarge,
                               NotConfigured, CertificateUnavailable)] == [
        401, 401, 400, 413, 404, 503
    ]
