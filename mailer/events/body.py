"""What an event webhook carries: its type, JSON body and signed headers (SPEC 13).

Pure: no I/O, no clock of its own. The body is encoded once, when the event is written,
and that exact text is signed and sent on every attempt, so a receiver that stores the
first copy sees the same bytes in a retry.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from mailer.client.signatures import sign
from mailer.store.status import MessageStatus
from mailer.times import iso


class EventType(StrEnum):
    """The event types an endpoint may subscribe to (SPEC 13)."""

    MESSAGE_SENT = "message.sent"
    MESSAGE_DEFERRED = "message.deferred"
    MESSAGE_FAILED = "message.failed"
    MESSAGE_UNKNOWN = "message.unknown"
    MESSAGE_SUPPRESSED = "message.suppressed"
    MESSAGE_BOUNCED = "message.bounced"
    MESSAGE_COMPLAINED = "message.complained"
    #: A person's own revoke: unsubscribe link, one-click, ``mailto:``, preference centre,
    #: or an unsubscribe a provider reports. Consents a service records itself raise none.
    RECIPIENT_UNSUBSCRIBED = "recipient.unsubscribed"
    CAMPAIGN_COMPLETED = "campaign.completed"


#: The event a message's new state raises. Queued, scheduled, sending, held and cancelled
#: raise none: they are our own bookkeeping, not news for the service.
FOR_STATUS: Mapping[str, EventType] = {
    MessageStatus.SENT: EventType.MESSAGE_SENT,
    MessageStatus.DEFERRED: EventType.MESSAGE_DEFERRED,
    MessageStatus.FAILED: EventType.MESSAGE_FAILED,
    MessageStatus.UNKNOWN: EventType.MESSAGE_UNKNOWN,
    MessageStatus.SUPPRESSED: EventType.MESSAGE_SUPPRESSED,
    MessageStatus.BOUNCED: EventType.MESSAGE_BOUNCED,
    MessageStatus.COMPLAINED: EventType.MESSAGE_COMPLAINED,
}

#: The keys of a message event's ``data``, every one always present (SPEC 13).
MESSAGE_KEYS = ("message_id", "status", "reason", "category", "template", "to",
                "recipient_external_id", "campaign_id", "smtp_code")
#: Prefix of event ids, the ``webhook-id`` header (the Standard Webhooks convention).
ID_PREFIX = "msg_"
#: An RFC 5321 reply code at the start of a report's diagnostic ("smtp; 550 5.1.1 ...").
_REPLY_CODE = re.compile(r"^(?:[a-z0-9-]+;\s*)?([2-5][0-9][0-9])(?![0-9])", re.IGNORECASE)


def new_event_id() -> str:
    """A fresh, unguessable event id: the ``webhook-id`` of every attempt to send it."""
    return f"{ID_PREFIX}{uuid.uuid4().hex}"


def message_data(
    *, message_id: str, status: str, reason: str | None, category: str, template: str,
    to: str | None, recipient_external_id: str | None, campaign_id: str | None,
    smtp_code: int | None,
) -> dict[str, Any]:
    """A message event's ``data``: every key of :data:`MESSAGE_KEYS`, null when n/a."""
    return {
        "message_id": message_id, "status": str(status), "reason": reason,
        "category": category, "template": template, "to": to,
        "recipient_external_id": recipient_external_id, "campaign_id": campaign_id,
        "smtp_code": smtp_code,
    }


def reply_code(diagnostic: str | None) -> int | None:
    """The SMTP reply code a bounce report's diagnostic starts with, if it does."""
    match = _REPLY_CODE.match(diagnostic.strip()) if diagnostic else None
    return int(match.group(1)) if match else None


def envelope(kind: EventType, at: datetime, data: Mapping[str, Any]) -> dict[str, Any]:
    """The body: ``{"type", "timestamp" (ISO 8601 UTC), "data"}``."""
    return {"type": kind.value, "timestamp": iso(at), "data": dict(data)}


def encode(body: Mapping[str, Any]) -> str:
    """The body as compact JSON, ASCII only, so no receiver can mistake its charset."""
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


def signed_headers(secret: str, event_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt.

    ``webhook-timestamp`` is the attempt's own time, not the event's: receivers refuse
    stale timestamps to stop replays, so a retry hours later carries a fresh one (and a
    fresh signature), under the same ``webhook-id``.
    """
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, event_id, timestamp, body),
    }
