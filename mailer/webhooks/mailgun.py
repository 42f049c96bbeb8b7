"""Mailgun webhooks: HMAC-SHA256 of timestamp + token, one-time tokens, then the event."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from mailer.reports.vocabulary import EventType, WebhookEvent
from mailer.webhooks._support import limits
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import NotConfigured, ParseError, Replayed, VerificationFailed
from mailer.webhooks._support.payload import (
    as_object,
    load_json,
    opt_object,
    opt_str,
    opt_text,
    req_str,
)
from mailer.webhooks._support.status import classify_status
from mailer.webhooks._support.times import from_unix

PROVIDER = "mailgun"
#: Largest body accepted, checked before verification.
MAX_BODY = limits.MAX_BODY

#: How far the signed timestamp may be from now (Mailgun's docs ask for a recent one).
MAX_SKEW = timedelta(minutes=5)

#: ``failed`` events by ``severity``. Mailgun sends ``temporary`` on every retry of one
#: message while it keeps trying, so it is a deferral: counting each as a soft bounce
#: would suppress a person after one slow message.
SEVERITIES: dict[str, EventType] = {
    "permanent": EventType.HARD_BOUNCE,
    "temporary": EventType.DEFERRED,
}

#: Permanent failures whose ``reason`` says something other than "the mailbox is gone".
#: "old": Mailgun gave up after retrying for hours, so the mailbox was never refused;
#: "espblock": the receiving provider blocked us, which is the sender's problem.
PERMANENT_REASONS: dict[str, tuple[EventType, bool]] = {
    "old": (EventType.SOFT_BOUNCE, False),
    "espblock": (EventType.SOFT_BOUNCE, True),
    "suppress-complaint": (EventType.COMPLAINT, False),
    "suppress-unsubscribe": (EventType.UNSUBSCRIBE, False),
}

#: Other events; ``accepted``, ``opened``, ``clicked``, ``stored`` and ``rejected`` are ignored.
SIMPLE_EVENTS: dict[str, EventType] = {
    "delivered": EventType.DELIVERED,
    "complained": EventType.COMPLAINT,
    "unsubscribed": EventType.UNSUBSCRIBE,
}


def verify(headers: Mapping[str, str], body: bytes, config: WebhookConfig, now: datetime) -> None:
    """Verify the HMAC, the timestamp's age and that the token was never used before.

    Mailgun signs only timestamp + token, not the event: the signature proves the request
    came from Mailgun, and the one-time token stops it being sent again, but a body
    altered in transit cannot be detected (use HTTPS).
    """
    key = config.mailgun_signing_key
    if key is None:
        raise NotConfigured("MAILER_MAILGUN_SIGNING_KEY is not set")
    signature = opt_object(as_object(load_json(body), "Mailgun body"), "signature")
    timestamp = opt_text(signature, "timestamp")
    token = opt_str(signature, "token")
    given = opt_str(signature, "signature")
    if not timestamp or not token or not given:
        raise VerificationFailed("signature fields are missing")
    message = (timestamp + token).encode("utf-8", "surrogatepass")
    expected = hmac.new(key.encode("utf-8", "surrogateescape"), message, hashlib.sha256).hexdigest()
    # compare_digest takes as long whatever the first differing byte, so response times
    # leak nothing about how much of a forged signature was right.
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode("utf-8", "replace")):
        raise VerificationFailed("Mailgun signature does not match")
    try:
        signed_at = from_unix(timestamp)
    except ParseError:
        raise Replayed("Mailgun timestamp is not Unix seconds") from None
    if abs(now - signed_at) > MAX_SKEW:
        raise Replayed("Mailgun timestamp is outside the accepted window")
    # Recorded only after the HMAC passed, so forged requests cannot fill the store. Once
    # the window has passed the timestamp check refuses the token anyway.
    if not config.seen_tokens.add_if_new(token, signed_at + MAX_SKEW):
        raise Replayed("Mailgun token was already used")


def parse(headers: Mapping[str, str], body: bytes) -> list[WebhookEvent]:
    """Turn a verified Mailgun body into zero or one event."""
    envelope = as_object(load_json(body), "Mailgun body")
    data = as_object(envelope.get("event-data"), "event-data")
    name = req_str(data, "event")
    status = opt_object(data, "delivery-status")
    code = opt_text(status, "code")
    diagnostic = " ".join(
        part for part in (code, opt_str(status, "message") or opt_str(status, "description"))
        if part
    ) or None
    classified, enhanced, policy = classify_status(code, diagnostic)
    if name == "failed":
        severity = req_str(data, "severity")
        reason = opt_str(data, "reason") or ""
        raw_type = f"failed/{severity}/{reason}".rstrip("/")
        type_ = SEVERITIES.get(severity, classified)
        if type_ is EventType.HARD_BOUNCE and reason in PERMANENT_REASONS:
            type_, forced_policy = PERMANENT_REASONS[reason]
            policy = policy or forced_policy
    elif name in SIMPLE_EVENTS:
        type_, raw_type = SIMPLE_EVENTS[name], name
    else:
        return []
    # An event without "id" is identified by its one-time signature token, which Mailgun
    # never reuses (SPEC 8); a missing recipient leaves our Message-ID to find the person.
    event_id = opt_str(data, "id") or opt_str(opt_object(envelope, "signature"), "token")
    if not event_id:
        raise ParseError("event has neither an id nor a signature token")
    return [
        WebhookEvent(
            provider=PROVIDER,
            event_id=event_id,
            type=type_,
            recipient=opt_str(data, "recipient"),
            occurred_at=from_unix(data.get("timestamp")),
            message_id=_message_id(data),
            diagnostic=diagnostic,
            enhanced_status=enhanced,
            policy_rejection=policy,
            raw_type=raw_type,
        )
    ]



def _message_id(data: Mapping[str, Any]) -> str | None:
    # Mailgun reports the Message-ID header of our message, without angle brackets.
    return opt_str(opt_object(opt_object(data, "message"), "headers"), "message-id")
