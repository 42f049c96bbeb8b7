"""Registered event webhook endpoints: create, read, delete (SPEC 7, 13).

The secret exists in clear only in the answer to its registration; the row keeps it
sealed (:mod:`mailer.events.secrets`). Deleting keeps the row with ``deleted_at`` set and
the secret wiped, and cancels the deliveries still pending, in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update

from mailer.errors import NotFound, ValidationFailed
from mailer.events.body import EventType
from mailer.events.record import DeliveryState
from mailer.events.secrets import SecretBox, new_secret
from mailer.store.schema import outbound_deliveries, webhook_endpoints
from mailer.times import iso

#: Most live endpoints: each event is written once per endpoint that wants it, in the
#: transaction of the state change, so their number bounds that transaction's work.
MAX_ENDPOINTS = 20
#: Longest ``description``.
MAX_DESCRIPTION = 500


@dataclass(frozen=True)
class Registered:
    """A new endpoint's row and its secret, which is never readable again."""

    row: Row[Any]
    secret: str


def parse_events(values: Sequence[str] | None) -> list[str] | None:
    """The event types asked for, deduplicated, in SPEC order; None means every type."""
    if values is None:
        return None
    known = [t.value for t in EventType]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValidationFailed("unknown event type", {"unknown": unknown, "known": known},
                               code="unknown_event_type")
    if not values:
        raise ValidationFailed("events must name at least one type, or be left out for all",
                               code="unknown_event_type")
    return [t for t in known if t in set(values)]


def create(conn: Connection, url: str, events: list[str] | None, description: str | None,
           api_key_id: int | None, box: SecretBox, now: datetime) -> Registered:
    """Store a new endpoint; the URL must have been checked (mailer.events.targets)."""
    live = conn.execute(select(func.count()).select_from(webhook_endpoints)
                        .where(webhook_endpoints.c.deleted_at.is_(None))).scalar_one()
    if live >= MAX_ENDPOINTS:
        raise ValidationFailed(f"at most {MAX_ENDPOINTS} endpoints; delete one first",
                               code="too_many_endpoints")
    endpoint_id = uuid.uuid4().hex
    secret = new_secret()
    conn.execute(insert(webhook_endpoints).values(
        id=endpoint_id, url=url, events=events, description=description,
        secret=box.seal(secret, endpoint_id), api_key_id=api_key_id, created_at=now,
        failures=0))
    return Registered(get(conn, endpoint_id), secret)


def get(conn: Connection, endpoint_id: str) -> Row[Any]:
    """A live endpoint's row, or :class:`NotFound`."""
    row = conn.execute(select(webhook_endpoints).where(
        webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.deleted_at.is_(None))
    ).first()
    if row is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    return row


def live(conn: Connection) -> list[Row[Any]]:
    """Every live endpoint, oldest first."""
    return list(conn.execute(select(webhook_endpoints)
                             .where(webhook_endpoints.c.deleted_at.is_(None))
                             .order_by(webhook_endpoints.c.created_at, webhook_endpoints.c.id)))


def delete(conn: Connection, endpoint_id: str, now: datetime) -> int:
    """Delete a live endpoint and cancel its pending deliveries; return how many."""
    result = conn.execute(
        update(webhook_endpoints)
        .where(webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.deleted_at.is_(None))
        .values(deleted_at=now, secret=""))
    if not result.rowcount:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    cancelled = conn.execute(
        update(outbound_deliveries)
        .where(outbound_deliveries.c.endpoint_id == endpoint_id,
               outbound_deliveries.c.state == DeliveryState.PENDING)
        .values(state=DeliveryState.CANCELLED))
    return int(cancelled.rowcount or 0)


def view(row: Row[Any]) -> dict[str, Any]:
    """An endpoint as the API shows it: never the secret."""
    return {
        "id": row.id, "url": row.url,
        "events": list(row.events) if row.events is not None else [t.value for t in EventType],
        "description": row.description, "created_at": iso(row.created_at),
        "failing_since": iso(row.failing_since), "last_error": row.last_error,
        "last_error_at": iso(row.last_error_at),
    }
