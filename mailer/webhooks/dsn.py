"""Bounce and complaint mail posted by our own MTA, read by :func:`mailer.reports.read_report`.

The body is one raw message as it reached our bounce address: an RFC 3464 DSN, an RFC
5965 ARF report, or any of the non-standard formats the reader knows (SPEC 4). It is
verified by a bearer token, then read and mapped to events by
:mod:`mailer.reports.events`. The HTTP route hands it to :class:`mailer.reports.intake.
ReportIntake`, which also records auto-replies and unreadable reports.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from datetime import UTC, datetime

from mailer.reports import read_report
from mailer.reports.events import is_mail, report_events
from mailer.reports.vocabulary import WebhookEvent
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import NotConfigured, ParseError, VerificationFailed
from mailer.webhooks._support.headers import header
from mailer.webhooks._support.limits import MAX_DSN_BODY

PROVIDER = "dsn"
#: Largest report accepted, checked before verification: reports may attach the original.
MAX_BODY = MAX_DSN_BODY


def verify(headers: Mapping[str, str], body: bytes, config: WebhookConfig, now: datetime) -> None:
    """Check the ``Authorization: Bearer`` token of our own report-forwarding MTA."""
    token = config.dsn_token
    if token is None:
        raise NotConfigured("MAILER_DSN_WEBHOOK_TOKEN is not set")
    scheme, _, given = (header(headers, "Authorization") or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise VerificationFailed("bearer token is missing")
    # Constant-time, on bytes: compare_digest refuses non-ASCII str, and timing must not
    # reveal how many leading characters of a guess were right.
    expected = token.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected):
        raise VerificationFailed("bearer token does not match")


def check_mail(body: bytes) -> None:
    """Raise ParseError unless ``body`` is a mail message at all.

    Anything that reached a bounce address is mail, and every message has From and Date
    (RFC 5322 section 3.6); garbage, JSON or a bare header block is unparseable (400,
    SPEC 8). Mail the reader cannot read is accepted and counted unrecognised instead.
    """
    if not is_mail(body):
        raise ParseError("body is not a mail message")


def parse(
    headers: Mapping[str, str], body: bytes, now: datetime | None = None
) -> list[WebhookEvent]:
    """Read a raw report into events; auto-replies and non-complaint feedback give none."""
    check_mail(body)
    received_at = now or datetime.now(UTC)
    return report_events(read_report(body), body, provider=PROVIDER, received_at=received_at)

