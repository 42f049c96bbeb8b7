"""Erasure of a recipient ("deactivate your account", SPEC 3).

What goes: the profile and its attributes, every stored message body and address (the
message rows stay, for aggregate statistics, with no way back to the person), pending
double opt-in requests, and the clear address on suppression entries.

What stays: a suppression entry keyed only by the HMAC of the normalised address with
reason ``erased``, so the address is never sent marketing again, and the consent ledger,
pseudonymised (``recipient_id`` cleared, keyed hash kept), so the organisation can still
prove what the person agreed to and when.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, or_, select, update

from mailer.events.record import redact_recipient
from mailer.runtime import Runtime
from mailer.store.outbox import add_events
from mailer.store.recipients import add_suppression, get_recipient
from mailer.store.schema import (
    consent_events,
    consent_requests,
    message_events,
    messages,
    recipients,
    suppressions,
)
from mailer.store.status import PENDING, MessageStatus

#: What replaces the address wherever it appears inside free text we keep.
REDACTED = "[erased]"


@dataclass(frozen=True)
class ErasureReport:
    """Counts of what one erasure touched (no personal data)."""

    messages_cancelled: int
    messages_scrubbed: int
    consents_pseudonymised: int
    suppressions_kept: int


def redact(value: Any, needle: str) -> Any:
    """Replace every string containing ``needle`` (case-insensitive) inside JSON-like data."""
    if isinstance(value, str):
        return REDACTED if needle in value.lower() else value
    if isinstance(value, list):
        return [redact(v, needle) for v in value]
    if isinstance(value, dict):
        return {k: redact(v, needle) for k, v in value.items()}
    return value


def _message_ids(conn: Connection, recipient_id: int, email_hash: str) -> list[str]:
    """This person's messages: linked to the profile, or sent by address with no profile."""
    return [r.id for r in conn.execute(
        select(messages.c.id).where(or_(
            messages.c.recipient_id == recipient_id,
            and_(messages.c.to_hash == email_hash, messages.c.recipient_id.is_(None)),
        ))
    )]


def _scrub_messages(
    conn: Connection, ids: Sequence[str], needle: str, now: datetime
) -> tuple[int, int]:
    """Cancel unfinished messages, then drop their bodies and addresses; return counts."""
    if not ids:
        return 0, 0
    cancelled = [r.id for r in conn.execute(
        update(messages)
                # Messages not finished are cancelled: there is nobody left to send them to.
        .where(messages.c.id.in_(list(ids)), messages.c.status.in_(sorted(PENDING)))
        .values(status=MessageStatus.CANCELLED, reason="erased", lease_until=None,
                updated_at=now)
        .returning(messages.c.id)
    )]
    add_events(conn, [(mid, MessageStatus.CANCELLED, "erased") for mid in cancelled], now)
    # SMTP replies and event details sometimes quote the address ("<a@b>: user unknown").
    responses = [
        {"b_id": r.id, "b_response": redact(r.smtp_response, needle)}
        for r in conn.execute(select(messages.c.id, messages.c.smtp_response)
                              .where(messages.c.id.in_(list(ids))))
    ]
    conn.execute(
        update(messages).where(messages.c.id == bindparam("b_id")).values(
            recipient_id=None, to_email=None, to_name=None, to_hash=None, data=None,
            smtp_response=bindparam("b_response"),
        ),
        responses,
    )
    details = [
        {"b_id": r.id, "b_detail": REDACTED}
        for r in conn.execute(select(message_events.c.id, message_events.c.detail)
                              .where(message_events.c.message_id.in_(list(ids))))
        if r.detail and needle in r.detail.lower()
    ]
    if details:
        conn.execute(update(message_events).where(message_events.c.id == bindparam("b_id"))
                     .values(detail=bindparam("b_detail")), details)
    return len(cancelled), len(ids)


def _pseudonymise_ledger(conn: Connection, recipient_id: int, needle: str) -> int:
    """Unlink the ledger from the profile; keep the keyed hash and the evidence, redacted."""
    rows = list(conn.execute(select(consent_events.c.id, consent_events.c.evidence)
                             .where(consent_events.c.recipient_id == recipient_id)))
    if rows:
        conn.execute(
            update(consent_events).where(consent_events.c.id == bindparam("b_id"))
            .values(recipient_id=None, evidence=bindparam("b_evidence")),
            [{"b_id": r.id, "b_evidence": redact(r.evidence, needle)} for r in rows],
        )
    return len(rows)


def erase(rt: Runtime, external_id: str) -> ErasureReport:
    """Erase the named recipient in one transaction; :class:`NotFound` if there is none."""
    now = rt.clock()
    with rt.engine.begin() as conn:
        person = get_recipient(conn, external_id)
        needle = person.email.lower()
        ids = _message_ids(conn, person.id, person.email_hash)
        cancelled, scrubbed = _scrub_messages(conn, ids, needle, now)
        # Outbound event webhooks about them (SPEC 13) keep no address either.
        redact_recipient(conn, person.id, ids)
        pseudonymised = _pseudonymise_ledger(conn, person.id, needle)
        conn.execute(delete(consent_requests)
                     .where(consent_requests.c.recipient_id == person.id))
        # Keep every entry (a hard bounce stays a hard bounce) but only by its keyed hash.
        conn.execute(update(suppressions).where(suppressions.c.email_hash == person.email_hash)
                     .values(email=None))
        add_suppression(conn, None, person.email_hash, "marketing", "erased", "erasure", now)
        kept = len(list(conn.execute(select(suppressions.c.id)
                                     .where(suppressions.c.email_hash == person.email_hash))))
        conn.execute(delete(recipients).where(recipients.c.id == person.id))
    return ErasureReport(cancelled, scrubbed, pseudonymised, kept)
