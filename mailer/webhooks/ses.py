"""Amazon SES events delivered through SNS: verify the SNS envelope, then map SES events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mailer.reports.vocabulary import EventType, WebhookEvent
from mailer.webhooks._support import limits, sns
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import NotConfigured, ParseError
from mailer.webhooks._support.payload import (
    as_list,
    as_object,
    load_json,
    opt_object,
    opt_str,
    req_str,
)
from mailer.webhooks._support.status import classify_status, find_enhanced
from mailer.webhooks._support.times import from_iso

PROVIDER = "ses"
#: Largest body accepted, checked before verification.
MAX_BODY = limits.MAX_BODY

#: SES ``bounceType`` to event type. Undetermined means SES could not tell: count it as
#: soft so one unreadable bounce never suppresses a person.
BOUNCE_TYPES: dict[str, EventType] = {
    "Permanent": EventType.HARD_BOUNCE,
    "Transient": EventType.SOFT_BOUNCE,
    "Undetermined": EventType.SOFT_BOUNCE,
}

#: ARF feedback types SES passes through that are not complaints (RFC 6430).
NOT_COMPLAINTS = frozenset({"not-spam"})


@dataclass(frozen=True)
class SnsSubscription:
    """A verified (Un)SubscriptionConfirmation: record it; visiting the URL is the caller's call."""

    kind: str
    topic_arn: str
    subscribe_url: str
    message_id: str


def verify(headers: Mapping[str, str], body: bytes, config: WebhookConfig, now: datetime) -> None:
    """Verify the SNS signature, certificate URL, topic and age of a raw body."""
    if not config.ses_topic_arns:
        raise NotConfigured("MAILER_SES_TOPIC_ARNS is not set")
    sns.verify_envelope(as_object(load_json(body), "SNS message"), config, now)


def parse(headers: Mapping[str, str], body: bytes) -> list[WebhookEvent] | SnsSubscription:
    """Turn a verified SNS body into SES events, or a subscription to record."""
    envelope = as_object(load_json(body), "SNS message")
    kind = req_str(envelope, "Type")
    if kind in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
        return SnsSubscription(
            kind=kind,
            topic_arn=req_str(envelope, "TopicArn"),
            subscribe_url=req_str(envelope, "SubscribeURL"),
            message_id=req_str(envelope, "MessageId"),
        )
    if kind != "Notification":
        raise ParseError("unknown SNS message type")
    sns_id = req_str(envelope, "MessageId")
    try:
        message = as_object(load_json(req_str(envelope, "Message").encode("utf-8")), "Message")
    except (ParseError, UnicodeEncodeError):
        # SES publishes a plain-text "Successfully validated SNS topic" notice when an event
        # destination is set up; it carries no event and must not be retried.
        return []
    ses_type = opt_str(message, "notificationType") or opt_str(message, "eventType")
    mail = opt_object(message, "mail")
    context = _Context(
        sns_id=sns_id,
        message_id=_our_message_id(mail),
        fallback_time=opt_str(mail, "timestamp") or req_str(envelope, "Timestamp"),
    )
    if ses_type == "Bounce":
        return _bounces(opt_object(message, "bounce"), context)
    if ses_type == "Complaint":
        return _complaints(opt_object(message, "complaint"), context)
    if ses_type == "Delivery":
        return _deliveries(opt_object(message, "delivery"), context)
    if ses_type == "DeliveryDelay":
        return _delays(opt_object(message, "deliveryDelay"), context)
    # Send, Reject, Open, Click, Rendering Failure and Subscription carry no bounce or
    # complaint; SES "reserves the right to add" types, so unknown ones are ignored too.
    return []



@dataclass(frozen=True)
class _Context:
    sns_id: str
    message_id: str | None
    fallback_time: str

    def event(
        self,
        type_: EventType,
        recipient: str | None,
        when: str | None,
        raw_type: str,
        diagnostic: str | None = None,
        enhanced: str | None = None,
        policy: bool = False,
    ) -> WebhookEvent:
        return WebhookEvent(
            provider=PROVIDER,
            # One SNS message may name several recipients; the pair is unique and stable
            # across SNS retries, which reuse the MessageId.
            event_id=f"{self.sns_id}:{recipient or ''}",
            type=type_,
            recipient=recipient,
            occurred_at=from_iso(when or self.fallback_time),
            message_id=self.message_id,
            diagnostic=diagnostic,
            enhanced_status=enhanced,
            policy_rejection=policy,
            raw_type=raw_type,
        )


def _our_message_id(mail: Mapping[str, Any]) -> str | None:
    # ``mail.headers`` lists the headers as we submitted them, so its Message-ID is ours;
    # ``commonHeaders.messageId`` is the fallback when headers were not included.
    for item in as_list(mail.get("headers") or [], "mail.headers"):
        entry = as_object(item, "mail header")
        if (opt_str(entry, "name") or "").lower() == "message-id":
            return opt_str(entry, "value")
    return opt_str(opt_object(mail, "commonHeaders"), "messageId")


def _recipients(container: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    # An entry without emailAddress is still handed on (SPEC 8): our Message-ID may name
    # the person, and otherwise it is counted as unrecognised.
    return [as_object(r, key) for r in as_list(container.get(key) or [], key)]


def _bounces(bounce: Mapping[str, Any], ctx: _Context) -> list[WebhookEvent]:
    bounce_type = req_str(bounce, "bounceType")
    raw_type = f"Bounce/{bounce_type}/{opt_str(bounce, 'bounceSubType') or ''}".rstrip("/")
    type_ = BOUNCE_TYPES.get(bounce_type, EventType.SOFT_BOUNCE)
    events = []
    for entry in _recipients(bounce, "bouncedRecipients"):
        diagnostic = opt_str(entry, "diagnosticCode")
        _, enhanced, policy = classify_status(opt_str(entry, "status"), diagnostic)
        events.append(
            ctx.event(
                type_, opt_str(entry, "emailAddress"), opt_str(bounce, "timestamp"), raw_type,
                diagnostic, enhanced, policy,
            )
        )
    return events


def _complaints(complaint: Mapping[str, Any], ctx: _Context) -> list[WebhookEvent]:
    feedback = opt_str(complaint, "complaintFeedbackType")
    if feedback in NOT_COMPLAINTS:
        return []
    when = opt_str(complaint, "timestamp")
    return [
        ctx.event(EventType.COMPLAINT, opt_str(entry, "emailAddress"), when, "Complaint")
        for entry in _recipients(complaint, "complainedRecipients")
    ]


def _deliveries(delivery: Mapping[str, Any], ctx: _Context) -> list[WebhookEvent]:
    when = opt_str(delivery, "timestamp")
    response = opt_str(delivery, "smtpResponse")
    events = []
    for item in as_list(delivery.get("recipients") or [], "recipients"):
        if not isinstance(item, str):
            raise ParseError("delivery recipient is not a string")
        events.append(
            ctx.event(EventType.DELIVERED, item, when, "Delivery", response,
                      find_enhanced(response))
        )
    return events


def _delays(delay: Mapping[str, Any], ctx: _Context) -> list[WebhookEvent]:
    when = opt_str(delay, "timestamp")
    raw_type = f"DeliveryDelay/{opt_str(delay, 'delayType') or ''}".rstrip("/")
    events = []
    for entry in _recipients(delay, "delayedRecipients"):
        diagnostic = opt_str(entry, "diagnosticCode")
        _, enhanced, policy = classify_status(opt_str(entry, "status"), diagnostic)
        events.append(
            ctx.event(EventType.DEFERRED, opt_str(entry, "emailAddress"), when, raw_type,
                      diagnostic, enhanced, policy)
        )
    return events
