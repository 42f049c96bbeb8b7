"""Writing events into the outbox, on the connection of the state change they report.

Every function here takes the caller's open transaction and writes nothing of its own
accord outside it (SPEC 13, "at least once"): the event exists exactly when the change
does. Each writes one ``outbound_events`` row per event and one ``outbound_deliveries``
row per endpoint that wants the type, and nothing when none does, so a deployment without
endpoints pays one small SELECT per state change.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Row, insert, or_, select, update

from mailer.events.body import (
    FOR_STATUS,
    EventType,
    encode,
    envelope,
    message_data,
    new_event_id,
)
from mailer.store.schema import (
    messages,
    outbound_deliveries,
    outbound_events,
    recipients,
    webhook_endpoints,
)
from mailer.times import iso

#: Ids per ``IN (...)`` list: well under SQLite's and PostgreSQL's parameter limits.
_CHUNK = 500


class DeliveryState(StrEnum):
    """Where one (event, endpoint) delivery stands."""

    #: Waiting for its first attempt or a retry (or claimed, under a lease).
    PENDING = "pending"
    #: The receiver answered 2xx.
    DELIVERED = "delivered"
    #: Failed for longer than :data:`mailer.events.retry.GIVE_UP_AFTER`; not tried again.
    DEAD = "dead"
    #: Its endpoint was deleted before it went out.
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class NewEvent:
    """One event to write: its type, its ``data``, and who it is about (for erasure)."""

    type: EventType
    data: Mapping[str, Any]
    message_id: str | None = None
    recipient_id: int | None = None


@dataclass(frozen=True)
class MessageChange:
    """A message that has just taken ``status`` in this transaction."""

    message_id: str
    status: str
    reason: str | None = None
    smtp_code: int | None = None


#: The endpoints not deleted, read on every slice a worker records: built once.
_LIVE_ENDPOINTS = (select(webhook_endpoints.c.id, webhook_endpoints.c.events)
                   .where(webhook_endpoints.c.deleted_at.is_(None))
                   .order_by(webhook_endpoints.c.id))


class Subscribers:
    """The live endpoints as this transaction sees them, and the types each wants."""

    def __init__(self, endpoints: Sequence[tuple[str, frozenset[str] | None]]) -> None:
        self._endpoints = list(endpoints)

    @classmethod
    def load(cls, conn: Connection) -> Subscribers:
        """Read the endpoints that are not deleted."""
        rows = conn.execute(_LIVE_ENDPOINTS)
        return cls([(r.id, None if r.events is None else frozenset(r.events)) for r in rows])

    def endpoints_for(self, kind: EventType) -> list[str]:
        """Ids of the endpoints that receive ``kind`` (all types when ``events`` is NULL)."""
        return [eid for eid, wanted in self._endpoints if wanted is None or kind in wanted]

    def wants(self, kind: EventType) -> bool:
        """Whether any endpoint receives ``kind``."""
        return any(wanted is None or kind in wanted for _, wanted in self._endpoints)


def record(conn: Connection, events: Sequence[NewEvent], now: datetime,
           subscribers: Subscribers | None = None) -> int:
    """Write ``events`` and their deliveries; return how many events had a subscriber."""
    if not events:
        return 0
    subs = Subscribers.load(conn) if subscribers is None else subscribers
    event_rows: list[dict[str, Any]] = []
    delivery_rows: list[dict[str, Any]] = []
    for event in events:
        targets = subs.endpoints_for(event.type)
        if not targets:
            continue
        event_id = new_event_id()
        event_rows.append({
            "id": event_id, "type": event.type.value,
            "body": encode(envelope(event.type, now, event.data)),
            "message_id": event.message_id, "recipient_id": event.recipient_id,
            "created_at": now,
        })
        delivery_rows += [
            {"event_id": event_id, "endpoint_id": endpoint_id,
             "state": DeliveryState.PENDING, "attempts": 0, "next_attempt_at": now,
             "created_at": now}
            for endpoint_id in targets
        ]
    if event_rows:
        conn.execute(insert(outbound_events), event_rows)
        conn.execute(insert(outbound_deliveries), delivery_rows)
    return len(event_rows)


def record_message_changes(conn: Connection, changes: Sequence[MessageChange],
                           now: datetime) -> int:
    """Write the events of message state changes made in this transaction at ``now``.

    Only a change this transaction really made raises an event: a compare-and-set that
    lost leaves the row in another state, or stamped with another moment, and the event
    belongs to whoever won. States without an event type are skipped.
    """
    subs = Subscribers.load(conn)
    wanted = [c for c in changes
              if c.status in FOR_STATUS and subs.wants(FOR_STATUS[c.status])]
    if not wanted:
        return 0
    found: dict[str, Any] = {}
    ids = sorted({c.message_id for c in wanted})
    for start in range(0, len(ids), _CHUNK):
        for row in conn.execute(
            select(messages.c.id, messages.c.status, messages.c.updated_at,
                   messages.c.category, messages.c.template, messages.c.to_email,
                   messages.c.campaign_id, messages.c.recipient_id,
                   recipients.c.external_id)
            .select_from(messages.outerjoin(recipients,
                                            recipients.c.id == messages.c.recipient_id))
            .where(messages.c.id.in_(ids[start:start + _CHUNK]))
        ):
            found[row.id] = row
    events: list[NewEvent] = []
    for change in wanted:
        m = found.get(change.message_id)
        if m is None or m.status != change.status or m.updated_at != now:
            continue
        data = message_data(
            message_id=m.id, status=m.status, reason=change.reason, category=m.category,
            template=m.template, to=m.to_email, recipient_external_id=m.external_id,
            campaign_id=m.campaign_id, smtp_code=change.smtp_code)
        events.append(NewEvent(FOR_STATUS[change.status], data, message_id=m.id,
                               recipient_id=m.recipient_id))
    return record(conn, events, now, subs)


def record_unsubscribe(
    conn: Connection, now: datetime, *, topics: Sequence[str], all_marketing: bool,
    source: str, recipient_id: int | None = None, email_hash: str | None = None,
) -> int:
    """Write ``recipient.unsubscribed`` for a person's own revoke.

    The person is named by profile id, or by address hash (a provider's report), which
    may match several profiles: each gets its event.
    """
    subs = Subscribers.load(conn)
    if not subs.wants(EventType.RECIPIENT_UNSUBSCRIBED):
        return 0
    query = select(recipients.c.id, recipients.c.external_id, recipients.c.email)
    if recipient_id is not None:
        query = query.where(recipients.c.id == recipient_id)
    elif email_hash is not None:
        query = query.where(recipients.c.email_hash == email_hash)
    else:
        raise ValueError("name the recipient by id or by address hash")
    events = [
        NewEvent(EventType.RECIPIENT_UNSUBSCRIBED, {
            "recipient_external_id": r.external_id, "email": r.email,
            "topics": sorted(set(topics)), "all_marketing": all_marketing, "source": source,
        }, recipient_id=r.id)
        for r in conn.execute(query.order_by(recipients.c.id))
    ]
    return record(conn, events, now, subs)


def record_campaign_completed(
    conn: Connection, campaigns: Sequence[Row[Any]],
    counts: Callable[[Sequence[Row[Any]]], Mapping[str, Mapping[str, Any]]], now: datetime,
) -> int:
    """Write ``campaign.completed`` for each campaign row; ``counts`` is called only when
    some endpoint wants the type, since counting a large campaign costs a scan."""
    subs = Subscribers.load(conn)
    if not campaigns or not subs.wants(EventType.CAMPAIGN_COMPLETED):
        return 0
    counted = counts(campaigns)
    events = [
        NewEvent(EventType.CAMPAIGN_COMPLETED, {
            "campaign_id": c.id, "name": c.name, "status": c.status,
            "category": c._mapping.get("category"), "template": c.template,
            "topic": c.topic, "started_at": iso(c.started_at),
            "finished_at": iso(c.finished_at),
            "counts": {k: v for k, v in counted.get(c.id, {}).items()
                       if not isinstance(v, Mapping)},
        })
        for c in campaigns
    ]
    return record(conn, events, now, subs)


def redact_recipient(conn: Connection, recipient_id: int, message_ids: Sequence[str]) -> int:
    """Erasure (SPEC 3): clear the address and external id in stored events about a person.

    Events still pending go out redacted; delivered ones keep no address until pruned.
    Returns how many event bodies changed.
    """
    found: list[Row[Any]] = []
    conditions = [outbound_events.c.recipient_id == recipient_id]
    ids = sorted(set(message_ids))
    for start in range(0, len(ids), _CHUNK):
        conditions.append(outbound_events.c.message_id.in_(ids[start:start + _CHUNK]))
    found = list(conn.execute(select(outbound_events.c.id, outbound_events.c.body)
                              .where(or_(*conditions))))
    changed = 0
    for row in found:
        body = json.loads(row.body)
        data = body.get("data") or {}
        for key in ("to", "email", "recipient_external_id"):
            if data.get(key) is not None:
                data[key] = None
        redacted = encode(body)
        if redacted != row.body:
            conn.execute(update(outbound_events).where(outbound_events.c.id == row.id)
                         .values(body=redacted))
            changed += 1
    return changed
