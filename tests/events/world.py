"""Helpers for the event tests: endpoints registered (and deleted) in the real database,
and reading back the events and deliveries written."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from mailer.errors import NotFound
from mailer.events import endpoints
from mailer.events.secrets import SecretBox
from mailer.runtime import Runtime
from mailer.store.schema import outbound_deliveries, outbound_events


@dataclass(frozen=True)
class Endpoint:
    """A registered endpoint: its id and its secret (as the 201 showed it)."""

    id: str
    secret: str


@contextmanager
def registered(rt: Runtime, url: str, events: Sequence[str] | None = None,
               ) -> Iterator[Endpoint]:
    """An endpoint stored directly (no target check), deleted again on exit so that the
    shared test database does not fan later tests' events out to it."""
    with rt.engine.begin() as conn:
        made = endpoints.create(conn, url, endpoints.parse_events(events), None, None,
                                SecretBox.from_settings(rt.settings), rt.clock())
    try:
        yield Endpoint(made.row.id, made.secret)
    finally:
        with rt.engine.begin() as conn, suppress(NotFound):  # the test deleted it itself
            endpoints.delete(conn, made.row.id, rt.clock())


def events_for(rt: Runtime, endpoint_id: str) -> list[dict[str, Any]]:
    """The events fanned out to ``endpoint_id``, oldest first, bodies parsed, with the
    delivery's state and attempts."""
    with rt.engine.connect() as conn:
        rows = conn.execute(
            select(outbound_events.c.id, outbound_events.c.body, outbound_deliveries.c.state,
                   outbound_deliveries.c.attempts, outbound_deliveries.c.last_error)
            .select_from(outbound_events.join(
                outbound_deliveries, outbound_deliveries.c.event_id == outbound_events.c.id))
            .where(outbound_deliveries.c.endpoint_id == endpoint_id)
            .order_by(outbound_deliveries.c.id))
        return [{"id": r.id, "body": json.loads(r.body), "state": r.state,
                 "attempts": r.attempts, "last_error": r.last_error} for r in rows]


def about(found: Sequence[dict[str, Any]], message_id: str) -> list[dict[str, Any]]:
    """The message events among ``found`` about ``message_id``."""
    return [e for e in found if e["body"]["data"].get("message_id") == message_id]
