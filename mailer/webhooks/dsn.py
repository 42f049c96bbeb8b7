"""Bounce reports posted by our own MTA: RFC 3464 DSNs and RFC 5965 ARF complaints."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from datetime import datetime
from email.message import Message

from mailer.webhooks import arf
from mailer.webhooks.config import WebhookConfig
from mailer.webhooks.errors import NotConfigured, ParseError, VerificationFailed
from mailer.webhooks.events import EventType, WebhookEvent, stable_event_id
from mailer.webhooks.headers import header
from mailer.webhooks.limits import MAX_DSN_BODY, check_size
from mailer.webhooks.report import (
    address,
    field,
    field_blocks,
    first_date,
    first_part,
    original_message_id,
    read_message,
    report_key,
    report_type,
)
from mailer.webhooks.status import classify_status, find_enhanced

PROVIDER = "dsn"
#: Largest report accepted, checked before verification: reports may attach the original.
MAX_BODY = MAX_DSN_BODY

#: ``Action`` values (RFC 3464 section 2.3.3) that produce an event; None means "decide
#: from Status". Other values are read by their Status when it is 4.x.x or 5.x.x (SPEC 4).
ACTIONS: dict[str, EventType | None] = {
    "failed": None,
    "delayed": EventType.DEFERRED,
    "delivered": EventType.DELIVERED,
}
#: Actions that say nothing about the final mailbox: ignored whatever their Status.
IGNORED_ACTIONS = frozenset({"relayed", "expanded"})

#: Address types of a recipient we could have mailed (RFC 3464 rfc822, RFC 6533 utf-8);
#: others (x400, unknown) are skipped (SPEC 4).
ADDRESS_TYPES = frozenset({"rfc822", "utf-8"})

_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})


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


def parse(headers: Mapping[str, str], body: bytes) -> list[WebhookEvent]:
    """Turn a raw report message into events; a message that is no report yields none."""
    report = read_message(body)
    kind = report_type(report)
    if kind == "delivery-status":
        return _delivery_events(report, report_key(report, body))
    if kind == "feedback-report":
        return arf.complaints(report, report_key(report, body))
    # Auto-replies and other mail that reaches the bounce address carry no outcome. A body
    # without the From and Date that every message has (RFC 5322 section 3.6) is no mail
    # at all, though: garbage, JSON, a bare header block. That is unparseable (400).
    if field(report, "From") is None or field(report, "Date") is None:
        raise ParseError("body is not a mail message")
    return []


def handle(
    headers: Mapping[str, str], body: bytes, config: WebhookConfig, now: datetime
) -> list[WebhookEvent]:
    """Verify the token first, then parse the body."""
    check_size(body, MAX_BODY)
    verify(headers, body, config, now)
    return parse(headers, body)


def _delivery_events(report: Message, key: str) -> list[WebhookEvent]:
    part = first_part(report, _STATUS_TYPES)
    blocks = field_blocks(part) if part is not None else []
    if not blocks:
        raise ParseError("delivery report has no delivery-status part")
    # Block 0 holds the per-message fields, every later block one recipient.
    per_message, recipients = blocks[0], blocks[1:]
    if not recipients:
        raise ParseError("delivery report has no per-recipient fields")
    message_id = original_message_id(report)
    # The report's own Date is when the MTA gave up or deferred; Arrival-Date (when our
    # message reached it) is the last resort. Per-recipient Last-Attempt-Date wins.
    try:
        report_date: datetime | None = first_date(
            field(report, "Date"), field(per_message, "Arrival-Date")
        )
    except ParseError:
        report_date = None
    events: dict[str, WebhookEvent] = {}
    nameless: WebhookEvent | None = None
    for block in recipients:
        event = _recipient_event(block, report_date, key, message_id)
        if event is not None and event.recipient is None:
            nameless = nameless or event
        # A recipient listed twice with the same Action is one outcome, reported once.
        elif event is not None and event.event_id not in events:
            events[event.event_id] = event
    if not events and nameless is not None:
        # A failure report with no usable recipient: handed on (once per report) so it is
        # accepted and counted as unrecognised, never acted on (SPEC 4).
        return [nameless]
    return list(events.values())


def _recipient(block: Message) -> str | None:
    """The address we mailed: ``Original-Recipient`` when usable, else ``Final-Recipient``."""
    # Original-Recipient is the address as we gave it in RCPT TO; Final-Recipient may be
    # what a forwarder rewrote it to, which we never mailed (SPEC 4).
    for name in ("Original-Recipient", "Final-Recipient"):
        value = field(block, name)
        if value is None:
            continue
        kind, sep, _ = value.partition(";")
        if sep and kind.strip().lower() not in ADDRESS_TYPES:
            continue
        found = address(value)
        if found is not None:
            return found
    return None


def _recipient_event(
    block: Message, report_date: datetime | None, key: str, message_id: str | None
) -> WebhookEvent | None:
    recipient = _recipient(block)
    # Action may carry a comment ("failed (mailbox gone)"): the first word decides.
    action = (field(block, "Action") or "").split(" ", 1)[0].split("(", 1)[0].lower()
    if action in IGNORED_ACTIONS:
        return None
    status = field(block, "Status")
    diagnostic = field(block, "Diagnostic-Code")
    classified, enhanced, policy = classify_status(status, diagnostic)
    if action not in ACTIONS and (find_enhanced(status) or "")[:1] not in ("4", "5"):
        return None
    type_ = ACTIONS.get(action) or classified
    if type_ is EventType.DELIVERED and action == "failed":
        # A failure reported with a 2.x.x status is contradictory; count, never suppress.
        type_ = EventType.SOFT_BOUNCE
    try:
        occurred_at: datetime | None = first_date(field(block, "Last-Attempt-Date"))
    except ParseError:
        occurred_at = report_date
    if occurred_at is None:
        if recipient is None:
            return None  # nothing usable in this block either way
        raise ParseError("delivery report has no usable date")
    return WebhookEvent(
        provider=PROVIDER,
        event_id=stable_event_id(PROVIDER, "delivery-status", key, recipient, action),
        type=type_,
        recipient=recipient,
        occurred_at=occurred_at,
        # A DSN must name its recipient (SPEC 4). Without one our Message-ID is left out,
        # so the applier does not fall back to that message's recipient as it does for
        # a redacted complaint: the report is unrecognised.
        message_id=message_id if recipient is not None else None,
        diagnostic=diagnostic,
        enhanced_status=enhanced,
        policy_rejection=policy,
        raw_type=action,
    )
