"""Turn a :class:`Report` into the shared event vocabulary the applier acts on (SPEC 4, 8).

Pure, like the reader. The mapping, as data where it can be:

- a bounce gives one event per recipient: ``hard_bounce`` only with evidence of
  permanence; a policy refusal (X.7.x without "no such user") is the sender's problem and
  never suppresses: a 5.x.x one marks the message bounced (``policy_rejection``), any other
  is only recorded (``deferred``); a delay warning is ``deferred``; the rest is
  ``soft_bounce``, which counts toward the soft-bounce limit;
- a complaint gives one ``complaint`` per recipient, or one naming nobody (a redacted
  report) with our Message-ID, by which the applier finds the person;
- an ARF ``opt-out`` is an ``unsubscribe``;
- an auto-reply, and a feedback report that is no complaint (``not-spam``, ``virus``),
  give no event: they are recorded as ignored by the caller;
- a report with no usable recipient gives one event naming nobody and no Message-ID, which
  the applier records as ``unrecognised`` and acts on no one.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parsedate_to_datetime

from mailer.reports.model import Recipient, Report, ReportKind
from mailer.reports.vocabulary import EventType, WebhookEvent, stable_event_id

#: Bytes read for the report's own header fields (Message-ID, Date, From).
MAX_HEADER_BYTES = 64 * 1024

#: Report kinds that change nothing and are only recorded (SPEC 4: auto-replies are not
#: bounces).
IGNORED_KINDS = frozenset({ReportKind.AUTO_REPLY})

#: Report kinds whose recipients each get one event of this type.
KIND_EVENTS: dict[ReportKind, EventType] = {
    ReportKind.COMPLAINT: EventType.COMPLAINT,
    ReportKind.UNSUBSCRIBE: EventType.UNSUBSCRIBE,
}


def own_fields(raw: bytes) -> dict[str, str]:
    """The report's own ``Message-ID``, ``Date`` and ``From``, where present."""
    head = raw[:MAX_HEADER_BYTES]
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    if end >= 0:
        head = head[:end]
    try:
        message = BytesHeaderParser(policy=compat32).parsebytes(head, headersonly=True)
    except Exception:  # the stdlib's header parser never should, but input is hostile
        return {}
    found: dict[str, str] = {}
    for name in ("Message-ID", "Date", "From"):
        value = message.get(name)
        if value is not None and str(value).strip():
            found[name] = str(value).strip()[:998]
    return found


def is_mail(raw: bytes) -> bool:
    """Whether ``raw`` is a mail message at all: one with the From and Date every message
    has (RFC 5322 section 3.6). Garbage, JSON and bare header blocks are not."""
    fields = own_fields(raw)
    return "From" in fields and "Date" in fields


def report_key(raw: bytes) -> str:
    """Identify a report: its own Message-ID, else a digest of its bytes."""
    return own_fields(raw).get("Message-ID") or hashlib.sha256(raw).hexdigest()


def report_time(raw: bytes, received_at: datetime) -> datetime:
    """When the report says it was written, never later than ``received_at``.

    A report's ``Date`` is the reporting MTA's word; it dates soft bounces within their
    window, but a clock in the future must not keep one counting longer.
    """
    value = own_fields(raw).get("Date")
    try:
        written = parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError, IndexError, OverflowError):
        written = None
    if written is None:
        return received_at
    # A "-0000" zone (RFC 5322 section 3.3: UTC, local zone unknown) comes back naive.
    written = written.replace(tzinfo=UTC) if written.tzinfo is None else written
    return min(written, received_at)


def recipient_type(recipient: Recipient) -> EventType:
    """The event a bounced recipient is (SPEC 4, "Reading real bounces")."""
    if recipient.delayed:
        return EventType.DEFERRED
    if recipient.policy:
        # 5.7.x is the sender's problem: the message failed, the recipient is not blamed.
        permanent = (recipient.status or "").startswith("5")
        return EventType.HARD_BOUNCE if permanent else EventType.DEFERRED
    return EventType.HARD_BOUNCE if recipient.hard else EventType.SOFT_BOUNCE


def report_events(
    report: Report, raw: bytes, *, provider: str, received_at: datetime
) -> list[WebhookEvent]:
    """The events ``report`` (read from ``raw``) gives; see the module docstring."""
    if report.kind in IGNORED_KINDS:
        return []
    key = report_key(raw)
    when = report_time(raw, received_at)
    if report.kind is ReportKind.BOUNCE:
        return [_bounce_event(r, report, key, when, provider) for r in report.recipients]
    type_ = KIND_EVENTS.get(report.kind)
    if type_ is not None:
        names: list[str | None] = [r.address for r in report.recipients] or [None]
        return [
            WebhookEvent(
                provider=provider,
                event_id=stable_event_id(provider, "feedback", key, name),
                type=type_, recipient=name, occurred_at=when, message_id=report.message_id,
                raw_type=f"feedback/{report.feedback_type or type_.value}",
            )
            for name in names
        ]
    if report.feedback_type is not None:
        # An ARF report that is no complaint (not-spam, virus, auth-failure): nothing to do.
        return []
    # Nobody usable: one event naming nobody and, deliberately, no Message-ID, so the
    # applier cannot fall back to that message's recipient as it does for a redacted
    # complaint. It is accepted and counted unrecognised (SPEC 4).
    return [nameless(key, when, provider, report.source)]


def nameless(key: str, when: datetime, provider: str, source: str = "") -> WebhookEvent:
    """The event of a report that names nobody we could act on."""
    return WebhookEvent(
        provider=provider, event_id=stable_event_id(provider, "unrecognised", key),
        type=EventType.SOFT_BOUNCE, recipient=None, occurred_at=when,
        raw_type=f"unrecognised/{source}" if source else "unrecognised",
    )


def _bounce_event(
    recipient: Recipient, report: Report, key: str, when: datetime, provider: str
) -> WebhookEvent:
    type_ = recipient_type(recipient)
    label = "delayed" if recipient.delayed else "policy" if recipient.policy else (
        "hard" if recipient.hard else "soft")
    return WebhookEvent(
        provider=provider,
        event_id=stable_event_id(provider, "bounce", key, recipient.address, label),
        type=type_, recipient=recipient.address, occurred_at=when,
        message_id=report.message_id, diagnostic=recipient.diagnostic,
        enhanced_status=recipient.status, policy_rejection=recipient.policy,
        raw_type=f"{report.source}/{label}" if report.source else label,
    )
