"""The one event vocabulary every source of reports is normalised into (SPEC section 8)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

#: Longest diagnostic text kept; SMTP replies can be long and are stored per event.
MAX_DIAGNOSTIC = 500


class EventType(StrEnum):
    """What happened to one message for one recipient."""

    DELIVERED = "delivered"
    HARD_BOUNCE = "hard_bounce"
    SOFT_BOUNCE = "soft_bounce"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    DEFERRED = "deferred"


@dataclass(frozen=True)
class WebhookEvent:
    """One normalised provider event; values are cleaned on construction.

    ``message_id`` is the RFC 5322 Message-ID of our own message, without angle brackets,
    when the payload carries it. ``recipient`` is the address as the provider gave it
    (brackets and blanks removed, case kept): the caller normalises it for suppression.
    ``policy_rejection`` marks X.7.x rejections, which SPEC section 4 says are the
    sender's problem and must never suppress the recipient.
    """

    provider: str
    event_id: str
    type: EventType
    recipient: str | None
    occurred_at: datetime
    message_id: str | None = None
    diagnostic: str | None = None
    enhanced_status: str | None = None
    policy_rejection: bool = False
    raw_type: str = ""

    def __post_init__(self) -> None:
        """Enforce the invariants: UTC-aware time, bare Message-ID, bounded diagnostic."""
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")
        object.__setattr__(self, "occurred_at", self.occurred_at.astimezone(UTC))
        object.__setattr__(self, "recipient", clean_address(self.recipient))
        object.__setattr__(self, "message_id", clean_message_id(self.message_id))
        object.__setattr__(self, "diagnostic", clean_diagnostic(self.diagnostic))


def clean_message_id(value: str | None) -> str | None:
    """Strip blanks and the angle brackets of a Message-ID; None when nothing is left."""
    if value is None:
        return None
    text = value.strip().strip("<>").strip()
    return text or None


def clean_address(value: str | None) -> str | None:
    """Strip blanks and angle brackets around an address; None when nothing is left."""
    if value is None:
        return None
    text = value.strip().strip("<>").strip()
    return text or None


def clean_diagnostic(value: str | None) -> str | None:
    """Collapse folded whitespace and keep at most :data:`MAX_DIAGNOSTIC` characters."""
    if value is None:
        return None
    text = " ".join(value.split())
    return text[:MAX_DIAGNOSTIC] or None


def stable_event_id(*parts: str | None) -> str:
    """Return a sha256 hex id of ``parts`` for providers that give no event id of their own.

    Parts are length-prefixed so that ("ab", "c") and ("a", "bc") never collide.
    """
    digest = hashlib.sha256()
    for part in parts:
        data = (part or "").encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()
