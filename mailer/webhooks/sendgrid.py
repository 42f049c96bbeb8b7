"""SendGrid Event Webhook: ECDSA P-256 signature over timestamp + raw body, then events."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from mailer.reports.vocabulary import EventType, WebhookEvent, stable_event_id
from mailer.webhooks._support import limits
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import NotConfigured, ParseError, Replayed, VerificationFailed
from mailer.webhooks._support.headers import header
from mailer.webhooks._support.payload import (
    as_list,
    as_object,
    load_json,
    opt_str,
    opt_text,
    req_str,
)
from mailer.webhooks._support.status import classify_status, find_enhanced
from mailer.webhooks._support.times import from_unix

PROVIDER = "sendgrid"
#: Largest body accepted, checked before verification.
MAX_BODY = limits.MAX_BODY
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

#: How far the signed timestamp may be from now. SendGrid documents no window; five
#: minutes bounds how long a captured request can be replayed.
MAX_SKEW = timedelta(minutes=5)

#: ``bounce`` events by their ``type``: "bounce" is SendGrid's hard bounce, "blocked" a
#: block or temporary rejection by the receiver, which is counted, not suppressed at once.
BOUNCE_TYPES: dict[str, EventType] = {
    "bounce": EventType.HARD_BOUNCE,
    "blocked": EventType.SOFT_BOUNCE,
}

#: ``dropped`` events by ``reason`` (lower-cased): SendGrid refused to send because the
#: address is on one of its own lists, so we mirror that list. Other reasons ("Spam
#: Content", "Invalid SMTPAPI header", ...) are about our message, not the person: ignored.
DROPPED_REASONS: dict[str, EventType] = {
    "bounced address": EventType.HARD_BOUNCE,
    "invalid": EventType.HARD_BOUNCE,
    "spam reporting address": EventType.COMPLAINT,
    "unsubscribed address": EventType.UNSUBSCRIBE,
}

#: Events that map without looking further; ``processed``, ``open``, ``click`` and
#: ``group_resubscribe`` are ignored (a resubscribe must come through our own consent flow).
SIMPLE_EVENTS: dict[str, EventType] = {
    "delivered": EventType.DELIVERED,
    "deferred": EventType.DEFERRED,
    "spamreport": EventType.COMPLAINT,
    "unsubscribe": EventType.UNSUBSCRIBE,
    "group_unsubscribe": EventType.UNSUBSCRIBE,
}


def verify(headers: Mapping[str, str], body: bytes, config: WebhookConfig, now: datetime) -> None:
    """Verify the ECDSA signature over timestamp + raw body, then the timestamp's age."""
    key = config.sendgrid_public_key
    if key is None:
        raise NotConfigured("MAILER_SENDGRID_PUBLIC_KEY is not set")
    signature_text = header(headers, SIGNATURE_HEADER)
    timestamp = header(headers, TIMESTAMP_HEADER)
    if not signature_text or not timestamp:
        raise VerificationFailed("signature headers are missing")
    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
        signed = timestamp.encode("ascii") + body
    except (binascii.Error, ValueError):
        raise VerificationFailed("signature headers are malformed") from None
    try:
        # The signature covers the exact bytes received: parsing and re-serialising the
        # JSON first would change them, so verification always runs on the raw body.
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise VerificationFailed("SendGrid signature does not match") from None
    if not timestamp.isdigit():
        raise Replayed("SendGrid timestamp is not Unix seconds")
    try:
        signed_at = from_unix(timestamp)
    except ParseError:
        raise Replayed("SendGrid timestamp is out of range") from None
    if abs(now - signed_at) > MAX_SKEW:
        raise Replayed("SendGrid timestamp is outside the accepted window")


def parse(headers: Mapping[str, str], body: bytes) -> list[WebhookEvent]:
    """Turn a verified JSON array of SendGrid events into events we act on."""
    events = []
    for item in as_list(load_json(body), "SendGrid body"):
        event = _event(as_object(item, "SendGrid event"))
        if event is not None:
            events.append(event)
    return events



def _event(item: Mapping[str, Any]) -> WebhookEvent | None:
    name = req_str(item, "event")
    reason = opt_str(item, "reason")
    status = opt_text(item, "status")
    diagnostic: str | None = None
    if name == "bounce":
        kind = opt_str(item, "type")
        classified, enhanced, policy = classify_status(status, reason)
        type_ = BOUNCE_TYPES.get(kind or "", classified)
        raw_type, diagnostic = f"bounce/{kind}" if kind else "bounce", reason
    elif name == "dropped":
        mapped = DROPPED_REASONS.get((reason or "").strip().lower())
        if mapped is None:
            return None
        type_, enhanced, policy, raw_type, diagnostic = mapped, None, False, "dropped", reason
    elif name in SIMPLE_EVENTS:
        type_, raw_type = SIMPLE_EVENTS[name], name
        diagnostic = opt_str(item, "response") or reason
        enhanced = find_enhanced(status) or find_enhanced(diagnostic)
        policy = False
        if type_ is EventType.DEFERRED:
            _, enhanced, policy = classify_status(status, diagnostic)
    else:
        return None
    # Every SendGrid event names its address; one that does not is still handed on and
    # counted as unrecognised unless our Message-ID names the person (SPEC 8).
    email = opt_str(item, "email")
    timestamp = item.get("timestamp")
    event_id = opt_str(item, "sg_event_id") or stable_event_id(
        PROVIDER, name, email, str(timestamp), opt_str(item, "sg_message_id")
    )
    return WebhookEvent(
        provider=PROVIDER,
        event_id=event_id,
        type=type_,
        recipient=email,
        occurred_at=from_unix(timestamp),
        # SendGrid reports the Message-ID header of the message as "smtp-id".
        message_id=opt_str(item, "smtp-id"),
        diagnostic=diagnostic,
        enhanced_status=enhanced,
        policy_rejection=policy,
        raw_type=raw_type,
    )
