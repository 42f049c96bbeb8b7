"""Finding messages: filters and a keyset cursor over ``(created_at, id)``, newest first.

A keyset cursor, unlike an offset, costs the same on page 1000 as on page 1 and neither
skips nor repeats a row when new messages arrive between pages. Messages accepted in
one batch share ``created_at``, so the id breaks ties.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, and_, or_, select

from mailer.errors import ValidationFailed
from mailer.store.schema import messages

#: ``limit`` when none is given, and the largest allowed (SPEC 7).
DEFAULT_PAGE = 50
MAX_PAGE = 500


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: just after (older than) this message."""

    created_at: datetime
    id: str

    def encode(self) -> str:
        """Opaque to callers: URL-safe base64 of a small JSON array."""
        raw = json.dumps([self.created_at.isoformat(), self.id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Read a cursor this module wrote; :class:`ValidationFailed` (422) otherwise."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            when, message_id = json.loads(raw)
            moment = datetime.fromisoformat(when)
            if moment.tzinfo is None or not isinstance(message_id, str) or len(message_id) > 32:
                raise ValueError("not a cursor")
            return cls(moment, message_id)
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
            raise ValidationFailed("cursor is not one this API returned",
                                   code="invalid_cursor") from None


@dataclass(frozen=True)
class MessageFilter:
    """Conditions every listed message meets; None means "any"."""

    status: str | None = None
    category: str | None = None
    template: str | None = None
    #: The keyed hash of the normalised address (SPEC 4): matched on the indexed column,
    #: never by reading addresses.
    to_hash: str | None = None
    campaign_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def list_messages(
    conn: Connection, where: MessageFilter, limit: int, after: Cursor | None = None
) -> tuple[list[Row[Any]], Cursor | None]:
    """One page of messages newest first, and the cursor of the next page (None at the end)."""
    conditions = [
        column == value
        for column, value in (
            (messages.c.status, where.status),
            (messages.c.category, where.category),
            (messages.c.template, where.template),
            (messages.c.to_hash, where.to_hash),
            (messages.c.campaign_id, where.campaign_id),
        )
        if value is not None
    ]
    if where.since is not None:
        conditions.append(messages.c.created_at >= where.since)
    if where.until is not None:
        conditions.append(messages.c.created_at < where.until)
    if after is not None:
        conditions.append(or_(
            messages.c.created_at < after.created_at,
            and_(messages.c.created_at == after.created_at, messages.c.id < after.id),
        ))
    # One more than asked tells whether another page exists without a second query.
    rows: Sequence[Row[Any]] = conn.execute(
        select(messages).where(*conditions)
        .order_by(messages.c.created_at.desc(), messages.c.id.desc())
        .limit(limit + 1)
    ).all()
    page = list(rows[:limit])
    more = len(rows) > limit
    return page, Cursor(page[-1].created_at, page[-1].id) if more and page else None
