"""Webhook sources: verify a provider's raw request, then normalise it (SPEC section 8).

Every source module offers ``verify(headers, body, config, now)``, ``parse(headers,
body)`` and ``handle(...)``, which checks the size, verifies the raw body and only then
parses it. ``headers`` is any ``Mapping[str, str]``; lookups are case-insensitive.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from mailer.webhooks import dsn, mailgun, postmark, sendgrid, ses
from mailer.webhooks.config import WebhookConfig
from mailer.webhooks.errors import (
    BodyTooLarge,
    CertificateUnavailable,
    NotConfigured,
    ParseError,
    Replayed,
    VerificationFailed,
    WebhookError,
)
from mailer.webhooks.events import EventType, WebhookEvent
from mailer.webhooks.limits import MAX_BODY, MAX_DSN_BODY
from mailer.webhooks.replay import MemorySeenTokens, SeenTokens
from mailer.webhooks.ses import SnsSubscription

__all__ = [
    "MAX_BODY",
    "MAX_DSN_BODY",
    "PROVIDERS",
    "BodyTooLarge",
    "CertificateUnavailable",
    "EventType",
    "MemorySeenTokens",
    "NotConfigured",
    "ParseError",
    "Replayed",
    "SeenTokens",
    "SnsSubscription",
    "VerificationFailed",
    "WebhookConfig",
    "WebhookError",
    "WebhookEvent",
    "WebhookSource",
    "body_limit",
    "source",
]


class WebhookSource(Protocol):
    """What every module in :data:`PROVIDERS` provides."""

    def verify(
        self, headers: Mapping[str, str], body: bytes, config: WebhookConfig, now: datetime
    ) -> None:
        """Raise VerificationFailed (or NotConfigured) unless the raw request is authentic."""
        ...

    def parse(
        self, headers: Mapping[str, str], body: bytes
    ) -> list[WebhookEvent] | SnsSubscription:
        """Normalise a verified body; raise ParseError when it cannot be understood."""
        ...

    def handle(
        self, headers: Mapping[str, str], body: bytes, config: WebhookConfig, now: datetime
    ) -> list[WebhookEvent] | SnsSubscription:
        """Check the size, verify, then parse."""
        ...


#: Source modules by the name used in ``POST /webhooks/<name>``.
PROVIDERS: dict[str, WebhookSource] = {
    "ses": ses,
    "sendgrid": sendgrid,
    "mailgun": mailgun,
    "postmark": postmark,
    "dsn": dsn,
}


def source(name: str, config: WebhookConfig) -> WebhookSource:
    """Return the configured source called ``name``; NotConfigured (404) otherwise."""
    if name not in PROVIDERS or name not in config.configured():
        raise NotConfigured(f"no webhook source {name!r} is configured")
    return PROVIDERS[name]


def body_limit(name: str) -> int:
    """Largest body the named source accepts: read no more than this from the request."""
    return MAX_DSN_BODY if name == "dsn" else MAX_BODY
