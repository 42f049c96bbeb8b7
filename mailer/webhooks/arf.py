"""Complaints in the Abuse Reporting Format (RFC 5965 ``report-type=feedback-report``)."""

from __future__ import annotations

from email.message import Message

from mailer.webhooks.errors import ParseError
from mailer.webhooks.events import EventType, WebhookEvent, stable_event_id
from mailer.webhooks.report import (
    address,
    field,
    field_blocks,
    first_date,
    first_part,
    original_message_id,
    text,
)

PROVIDER = "dsn"

#: ``Feedback-Type`` (RFC 5965, 6430, 6591) to event type; None means "not a complaint".
FEEDBACK_TYPES: dict[str, EventType | None] = {
    "abuse": EventType.COMPLAINT,
    # The recipient reported our mail as a phishing or fraud attempt: a complaint too.
    "fraud": EventType.COMPLAINT,
    # Virus reports come from scanners, not people; "other" says nothing definite.
    "virus": None,
    "other": None,
    # RFC 6430: the user said the message is NOT spam.
    "not-spam": None,
    # RFC 6591: our own SPF/DKIM/DMARC failed; the sender's problem.
    "auth-failure": None,
}

_FEEDBACK_TYPES = frozenset({"message/feedback-report"})


def complaints(report: Message, key: str) -> list[WebhookEvent]:
    """Return the complaint events of an ARF report identified by ``key``.

    The recipient comes from ``Original-Rcpt-To``. A redacted report has none: the event
    then has ``recipient=None`` and our original's ``message_id`` so the caller can find
    the person. A report naming neither yields one event with neither, which the caller
    accepts and counts as unrecognised (SPEC 4).
    """
    part = first_part(report, _FEEDBACK_TYPES)
    blocks = field_blocks(part) if part is not None else []
    if not blocks:
        raise ParseError("feedback report has no message/feedback-report part")
    fields = blocks[0]
    feedback = field(fields, "Feedback-Type")
    if feedback is None:
        raise ParseError("feedback report has no Feedback-Type")
    feedback = feedback.lower()
    type_ = FEEDBACK_TYPES.get(feedback)
    if type_ is None:
        return []
    message_id = original_message_id(report)
    occurred_at = first_date(field(report, "Date"), field(fields, "Arrival-Date"))
    recipients = [address(text(v)) for v in fields.get_all("Original-Rcpt-To") or []]
    found: list[str | None] = [r for r in recipients if r] or [None]
    return [
        WebhookEvent(
            provider=PROVIDER,
            event_id=stable_event_id(PROVIDER, "feedback", key, recipient),
            type=type_,
            recipient=recipient,
            occurred_at=occurred_at,
            message_id=message_id,
            raw_type=f"feedback/{feedback}",
        )
        for recipient in dict.fromkeys(found)
    ]
