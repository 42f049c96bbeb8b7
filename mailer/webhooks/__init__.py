"""Webhook sources: verify a provider's raw request, then normalise it (SPEC section 8).

Every provider module (``ses``, ``sendgrid``, ``mailgun``, ``postmark``, ``dsn``) offers
``MAX_BODY``, ``verify(headers, body, config, now)`` and ``parse(headers, body)``;
:func:`handle` runs them in the one safe order for all of them. ``headers`` is any
``Mapping[str, str]``; lookups are case-insensitive. What the providers share lives in the
private ``_support`` package and is re-exported here for the rest of mailer.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from mailer.reports.vocabulary import EventType, WebhookEvent, stable_event_id
from mailer.webhooks import dsn, mailgun, postmark, sendgrid, ses
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import (
    BodyTooLarge,
    CertificateUnavailable,
    NotConfigured,
    ParseError,
    Replayed,
    VerificationFailed,
    WebhookError,
)
from mailer.webhooks._support.limits import MAX_BODY, MAX_DSN_BODY, check_size
from mailer.webhooks._support.replay import MemorySeenTokens, SeenTokens
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
    "check_size",
    "handle",
    "source",
    "stable_event_id",
]


class WebhookSource(Protocol):
    """What every module in :data:`PROVIDERS` provides."""

    #: Largest body the provider accepts, checked before any verification work.
    MAX_BODY: int

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


def handle(
    provider: WebhookSource,
    headers: Mapping[str, str],
    body: bytes,
    config: WebhookConfig,
    now: datetime,
) -> list[WebhookEvent] | SnsSubscription:
    """Check the size, verify the raw body, and only then parse it.

    The order is the point: nothing of an unauthenticated body is parsed (a parser is
    attack surface, and a forged body must cost no more than a signature check), and the
    signature is checked on the bytes as received, before any re-serialisation.
    """
    check_size(body, provider.MAX_BODY)
    provider.verify(headers, body, config, now)
    return provider.parse(headers, body)
