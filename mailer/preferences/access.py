"""Everything held about one recipient, as JSON-ready data (SPEC 3: the right of access).

``GET /v1/recipients/{id}`` shows the profile, current preferences, suppressions and the
full consent ledger; the export adds pending opt-ins and every message with its history.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, and_, or_, select

from mailer.store.recipients import get_recipient, ledger, preferences, suppression_rows
from mailer.store.schema import consent_requests, message_events, messages
from mailer.times import iso
from suppression.consent import THIRD_PARTY_SHARING

#: Bumped when the shape of the export changes, so a reader can tell versions apart.
EXPORT_FORMAT = 1


def profile(row: Any) -> dict[str, Any]:
    """The profile fields of a recipient row."""
    return {
        "external_id": row.external_id, "email": row.email, "name": row.name,
        "locale": row.locale, "attributes": row.attributes or {},
        "account_active": bool(row.account_active),
        "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
    }


def recipient_view(conn: Connection, external_id: str) -> tuple[Any, dict[str, Any]]:
    """The profile row, and what ``GET /v1/recipients/{id}`` shows of it.

    Preferences per topic and third-party sharing (from the ledger, latest wins), every
    suppression of the address, and the full consent ledger.
    """
    row = get_recipient(conn, external_id)
    prefs = preferences(conn, row.id)
    sharing = prefs.pop(THIRD_PARTY_SHARING)
    return row, {
        "preferences": prefs,
        "third_party_sharing": sharing,
        "suppressions": [
            {"scope": s.scope, "reason": s.reason, "source": s.source,
             "created_at": iso(s.created_at), "expires_at": iso(s.expires_at)}
            for s in suppression_rows(conn, row.email_hash)
        ],
        "consents": [
            {"id": e.id, "topic": e.topic, "granted": bool(e.granted), "source": e.source,
             "policy_version": e.policy_version, "occurred_at": iso(e.occurred_at),
             "recorded_at": iso(e.recorded_at), "evidence": e.evidence}
            for e in ledger(conn, row.id)
        ],
    }


def _messages(conn: Connection, recipient_id: int, email_hash: str) -> list[dict[str, Any]]:
    rows = list(conn.execute(
        select(messages).where(or_(
            messages.c.recipient_id == recipient_id,
            and_(messages.c.to_hash == email_hash, messages.c.recipient_id.is_(None)),
        )).order_by(messages.c.created_at, messages.c.id)
    ))
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ids = [r.id for r in rows]
    for start in range(0, len(ids), 500):
        for e in conn.execute(
            select(message_events)
            .where(message_events.c.message_id.in_(ids[start:start + 500]))
            .order_by(message_events.c.at, message_events.c.id)
        ):
            events[e.message_id].append({"at": iso(e.at), "type": e.type, "detail": e.detail})
    return [
        {
            "id": r.id, "category": r.category, "template": r.template, "topic": r.topic,
            "to_email": r.to_email, "to_name": r.to_name, "data": r.data,
            "status": r.status, "reason": r.reason, "attempts": r.attempts,
            "message_id": r.message_id_header, "created_at": iso(r.created_at),
            "sent_at": iso(r.sent_at), "smtp_response": r.smtp_response,
            "events": events.get(r.id, []),
        }
        for r in rows
    ]


def export_recipient(conn: Connection, external_id: str) -> dict[str, Any]:
    """Profile, preferences, suppressions, full ledger, pending opt-ins and messages."""
    person, held = recipient_view(conn, external_id)
    return {
        "format": EXPORT_FORMAT,
        "profile": profile(person),
        **held,
        "pending_consents": [
            {"id": r.id, "topic": r.topic, "source": r.source,
             "policy_version": r.policy_version, "requested_at": iso(r.requested_at),
             "confirmed_at": iso(r.confirmed_at), "evidence": r.evidence}
            for r in conn.execute(
                select(consent_requests)
                .where(consent_requests.c.recipient_id == person.id)
                .order_by(consent_requests.c.recorded_at, consent_requests.c.id)
            )
        ],
        "messages": _messages(conn, person.id, person.email_hash),
    }
