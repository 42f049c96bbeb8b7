"""Postmark webhooks: HTTP basic auth (Postmark signs nothing), routed on RecordType and Type."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from datetime import datetime
from email.parser import HeaderParser
from typing import Any

from mailer.reports.vocabulary import EventType, WebhookEvent, stable_event_id
from mailer.webhooks._support import limits
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import NotConfigured, VerificationFailed
from mailer.webhooks._support.headers import header
from mailer.webhooks._support.payload import (
    as_list,
    as_object,
    load_json,
    opt_object,
    opt_str,
    opt_text,
    req_str,
)
from mailer.webhooks._support.status import classify_status
from mailer.webhooks._support.times import from_iso

PROVIDER = "postmark"
#: Largest body accepted, checked before verification.
MAX_BODY = limits.MAX_BODY

#: Bounce ``Type`` to (event type, policy rejection); None means "ignore". Routed on the
#: name, not ``TypeCode``, because captured spam-complaint payloads disagree on the code.
BOUNCE_TYPES: dict[str, tuple[EventType, bool] | None] = {
    "HardBounce": (EventType.HARD_BOUNCE, False),
    "BadEmailAddress": (EventType.HARD_BOUNCE, False),
    "SoftBounce": (EventType.SOFT_BOUNCE, False),
    "Transient": (EventType.SOFT_BOUNCE, False),
    "DnsError": (EventType.SOFT_BOUNCE, False),
    "Unknown": (EventType.SOFT_BOUNCE, False),
    # The receiver refused us for content, reputation or our own DMARC failure: the
    # sender's problem (SPEC section 4), counted but flagged so nobody is suppressed.
    "Blocked": (EventType.SOFT_BOUNCE, True),
    "VirusNotification": (EventType.SOFT_BOUNCE, True),
    "DMARCPolicy": (EventType.SOFT_BOUNCE, True),
    "SpamNotification": (EventType.COMPLAINT, False),
    "SpamComplaint": (EventType.COMPLAINT, False),
    # An "unsubscribe me" reply that Postmark recognised.
    "Unsubscribe": (EventType.UNSUBSCRIBE, False),
    # Resubscribing only happens through our own consent flow (SPEC section 3).
    "Subscribe": None,
    # Out-of-office replies, address-change notices, challenge-response systems and relay
    # tests say nothing about whether the mailbox accepts mail.
    "AutoResponder": None,
    "AddressChange": None,
    "ChallengeVerification": None,
    "OpenRelayTest": None,
    # Set by a Postmark account user or caused by our own API or template use.
    "ManuallyDeactivated": None,
    "Unconfirmed": None,
    "SMTPApiError": None,
    "InboundError": None,
    "TemplateRenderingFailed": None,
}

#: ``SuppressionReason`` of a SubscriptionChange that stops sending.
SUPPRESSION_REASONS: dict[str, EventType] = {
    "HardBounce": EventType.HARD_BOUNCE,
    "SpamComplaint": EventType.COMPLAINT,
    "ManualSuppression": EventType.UNSUBSCRIBE,
}

#: Metadata keys (case-insensitive) under which the sender may pass our Message-ID, e.g. by
#: sending the header ``X-PM-Metadata-message-id``.
MESSAGE_ID_METADATA = ("message-id", "message_id", "messageid")


def verify(headers: Mapping[str, str], body: bytes, config: WebhookConfig, now: datetime) -> None:
    """Check the HTTP basic credentials Postmark sends from the webhook URL."""
    user, password = config.postmark_user, config.postmark_password
    if user is None or password is None:
        raise NotConfigured("MAILER_POSTMARK_WEBHOOK_USER/_PASSWORD are not set")
    given_user, given_password = _basic_credentials(header(headers, "Authorization"))
    # Both compared in constant time and both always compared, so neither timing nor an
    # early exit tells an attacker which half, or how much of it, was right.
    user_ok = hmac.compare_digest(given_user, user.encode("utf-8", "surrogateescape"))
    password_ok = hmac.compare_digest(
        given_password, password.encode("utf-8", "surrogateescape")
    )
    if not (user_ok & password_ok):
        raise VerificationFailed("Postmark credentials do not match")


def parse(headers: Mapping[str, str], body: bytes) -> list[WebhookEvent]:
    """Turn a verified Postmark record into zero or one event."""
    record = as_object(load_json(body), "Postmark body")
    kind = req_str(record, "RecordType")
    message_id = _our_message_id(record)
    if kind == "Bounce" or kind == "SpamComplaint":
        bounce_type = req_str(record, "Type")
        mapped = BOUNCE_TYPES.get(bounce_type)
        if mapped is None:
            return []
        type_, forced_policy = mapped
        diagnostic = opt_str(record, "Details") or opt_str(record, "Description")
        _, enhanced, policy = classify_status(None, opt_str(record, "Details"))
        # A record without Email is applied as far as it can be (SPEC 8): our Message-ID,
        # when present, names the person; without either it is counted as unrecognised.
        email = opt_str(record, "Email")
        when = req_str(record, "BouncedAt")
        record_id = opt_text(record, "ID")
        event_id = (f"{kind}:{record_id}" if record_id is not None else stable_event_id(
            PROVIDER, kind, opt_str(record, "MessageID"), email, when, bounce_type))
        event = _event(
            record, event_id, type_, email, when, message_id, f"{kind}/{bounce_type}",
            diagnostic, enhanced, policy or forced_policy,
        )
    elif kind == "Delivery":
        recipient = opt_str(record, "Recipient")
        when = req_str(record, "DeliveredAt")
        # Delivery records carry no ID of their own; Postmark's MessageID and the
        # recipient identify one delivery.
        event_id = stable_event_id(PROVIDER, kind, opt_str(record, "MessageID"), recipient)
        event = _event(
            record, event_id, EventType.DELIVERED, recipient, when, message_id, kind,
            opt_str(record, "Details"),
        )
    elif kind == "SubscriptionChange":
        reason = opt_str(record, "SuppressionReason")
        # SuppressSending false is a reactivation; it never lifts our own blocks.
        if record.get("SuppressSending") is not True or reason not in SUPPRESSION_REASONS:
            return []
        recipient = opt_str(record, "Recipient")
        when = req_str(record, "ChangedAt")
        event_id = stable_event_id(
            PROVIDER, kind, opt_str(record, "MessageID"), recipient, when, reason
        )
        event = _event(
            record, event_id, SUPPRESSION_REASONS[reason], recipient, when, message_id,
            f"{kind}/{reason}",
        )
    else:
        # Open, Click and record types added later are not delivery outcomes.
        return []
    return [event]



def _basic_credentials(value: str | None) -> tuple[bytes, bytes]:
    # RFC 7617: "Basic " + base64(user ":" password); the user may not contain ":".
    scheme, _, encoded = (value or "").strip().partition(" ")
    if scheme.lower() != "basic":
        raise VerificationFailed("basic credentials are missing")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise VerificationFailed("basic credentials are malformed") from None
    user, colon, password = decoded.partition(b":")
    if not colon:
        raise VerificationFailed("basic credentials are malformed")
    return user, password


def _event(
    record: Mapping[str, Any],
    event_id: str,
    type_: EventType,
    recipient: str | None,
    when: str,
    message_id: str | None,
    raw_type: str,
    diagnostic: str | None = None,
    enhanced: str | None = None,
    policy: bool = False,
) -> WebhookEvent:
    return WebhookEvent(
        provider=PROVIDER,
        event_id=event_id,
        type=type_,
        recipient=recipient,
        occurred_at=from_iso(when),
        message_id=message_id,
        diagnostic=diagnostic,
        enhanced_status=enhanced,
        policy_rejection=policy,
        raw_type=raw_type,
    )


def _our_message_id(record: Mapping[str, Any]) -> str | None:
    # "MessageID" is Postmark's own id, never our Message-ID header. Ours is found in the
    # metadata we attached, in a Headers list, or in the bounced message's Content.
    for key, value in opt_object(record, "Metadata").items():
        if key.lower() in MESSAGE_ID_METADATA and isinstance(value, str):
            return value
    for item in as_list(record.get("Headers") or [], "Headers"):
        entry = as_object(item, "header")
        if (opt_str(entry, "Name") or "").lower() == "message-id":
            return opt_str(entry, "Value")
    content = opt_str(record, "Content")
    if content:
        found = HeaderParser().parsestr(content, headersonly=True).get("Message-ID")
        return str(found) if found is not None else None
    return None
