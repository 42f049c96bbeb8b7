"""Tie a reported bounce or complaint to mail we sent (SPEC 4), or say why it cannot be.

A report acts only on mail we sent. Each event is tied to a message we sent to the
address it names: by a VERP token (``verp_message_id``), by our ``Message-ID`` (the
event's recipient must be that message's recipient), or, when it carries no Message-ID of
ours, by mail sent to that address in the :data:`MATCH_WINDOW` before the report arrived.
An event that cannot be tied is ``unmatched``; one without a usable recipient is
``unrecognised``. The lookups are a few bulk queries per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Connection, Row, and_, or_, select

from mailer.reports.vocabulary import WebhookEvent
from mailer.runtime import Runtime
from mailer.store.recipients import Address
from mailer.store.schema import messages
from mailer.store.status import HANDED_TO_RELAY
from suppression.addresses import InvalidAddressError

#: How far back a report without our Message-ID may find mail we sent (SPEC 4), measured
#: from when the report arrived by our own clock: the report's dates are the sender's word.
MATCH_WINDOW = timedelta(days=30)

#: IN-list size for the bulk lookups: below every database's bound-parameter limit.
BATCH = 500

_MESSAGE_COLUMNS = (
    messages.c.id, messages.c.message_id_header, messages.c.to_hash, messages.c.topic,
    messages.c.status, messages.c.recipient_id,
)

_T = TypeVar("_T")


class Result(StrEnum):
    """What became of one reported event (the ``result`` label of /metrics)."""

    APPLIED = "applied"
    UNMATCHED = "unmatched"
    UNRECOGNISED = "unrecognised"


@dataclass(frozen=True)
class Tie:
    """An event tied to mail we sent: the address it acts on and, if known, our message."""

    email_hash: str
    address: Address | None
    message: Row[Any] | None


@dataclass(frozen=True)
class Miss:
    """An event that changes nothing: unmatched or unrecognised, and why."""

    result: Result
    reason: str
    email_hash: str | None = None


def chunks(values: Sequence[_T]) -> Iterable[Sequence[_T]]:
    """``values`` in slices of :data:`BATCH`."""
    for start in range(0, len(values), BATCH):
        yield values[start : start + BATCH]


class ReportMatcher:
    """Ties the events of one report to mail we sent, in the caller's transaction."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def match(
        self, conn: Connection, events: Sequence[WebhookEvent], verp_message_id: str | None,
        now: datetime,
    ) -> list[Tie | Miss]:
        """Tie each event to mail we sent, with one bulk query per kind of evidence."""
        parsed = [self._address(event) for event in events]
        ours = self._messages_by_header(conn, events)
        verp: Any = None
        if verp_message_id is not None:
            verp = conn.execute(
                select(*_MESSAGE_COLUMNS).where(messages.c.id == verp_message_id)
            ).first()
        # Only events without a Message-ID of ours fall back to recent mail.
        fallback = sorted({
            address.hash for event, (address, _) in zip(events, parsed, strict=True)
            if address is not None and verp_message_id is None
            and message_id_header(event) not in ours
        })
        recent = self._recently_mailed(conn, fallback, now)
        out: list[Tie | Miss] = []
        for event, (address, invalid) in zip(events, parsed, strict=True):
            if verp_message_id is not None:
                out.append(_tie_to_message(verp, None, False, reason="unknown_verp_token"))
                continue
            message = ours.get(message_id_header(event) or "")
            if message is not None:
                out.append(_tie_to_message(message, address, invalid, reason="not_sent"))
            elif invalid:
                out.append(Miss(Result.UNRECOGNISED, "invalid_recipient"))
            elif address is None:
                # Neither a recipient nor our Message-ID: nobody to tie it to. A Message-ID
                # that is not ours counts as none (SPEC 4).
                out.append(Miss(Result.UNRECOGNISED, "no_recipient"))
            elif address.hash in recent:
                out.append(Tie(address.hash, address, None))
            else:
                out.append(Miss(Result.UNMATCHED, "not_mailed_recently", address.hash))
        return out

    def _address(self, event: WebhookEvent) -> tuple[Address | None, bool]:
        """The event's normalised recipient (None if it names none) and whether it was bad."""
        if event.recipient is None:
            return None, False
        try:
            return self.rt.address(event.recipient), False
        except InvalidAddressError:
            return None, True

    @staticmethod
    def _messages_by_header(
        conn: Connection, events: Sequence[WebhookEvent]
    ) -> dict[str, Any]:
        """Our message rows whose Message-ID the events carry, by that header."""
        headers = sorted({h for h in (message_id_header(e) for e in events) if h})
        found: dict[str, Any] = {}
        for chunk in chunks(headers):
            for row in conn.execute(
                select(*_MESSAGE_COLUMNS).where(messages.c.message_id_header.in_(chunk))
            ):
                found[row.message_id_header] = row
        return found

    @staticmethod
    def _recently_mailed(conn: Connection, hashes: Sequence[str], now: datetime) -> set[str]:
        """The address hashes among ``hashes`` we sent mail to within the window."""
        cutoff = now - MATCH_WINDOW
        # sent_at is set on "sent" only; a message whose fate is unknown or that is being
        # retried was last handed over when it was last updated.
        recent = or_(messages.c.sent_at >= cutoff,
                     and_(messages.c.sent_at.is_(None), messages.c.updated_at >= cutoff))
        found: set[str] = set()
        for chunk in chunks(hashes):
            found.update(r[0] for r in conn.execute(
                select(messages.c.to_hash).distinct().where(
                    messages.c.to_hash.in_(chunk),
                    messages.c.status.in_(sorted(HANDED_TO_RELAY)), recent)
            ))
        return found

def message_id_header(event: WebhookEvent) -> str | None:
    """The event's Message-ID as we store it (with angle brackets), or None."""
    return f"<{event.message_id}>" if event.message_id else None


def _tie_to_message(
    message: Row[Any] | None, address: Address | None, invalid: bool, *, reason: str
) -> Tie | Miss:
    """Tie an event to ``message`` when it is mail we sent to the event's recipient."""
    if message is None or message.status not in HANDED_TO_RELAY:
        return Miss(Result.UNMATCHED, reason, address.hash if address else None)
    if message.to_hash is None:
        # The recipient was erased since: there is nobody left to act on.
        return Miss(Result.UNMATCHED, "recipient_erased", address.hash if address else None)
    if invalid:
        return Miss(Result.UNRECOGNISED, "invalid_recipient")
    if address is None:
        # A redacted complaint names nobody; our Message-ID names the person (SPEC 8).
        return Tie(message.to_hash, None, message)
    if address.hash != message.to_hash:
        # Our real Message-ID quoted for a third person: the report is not about them.
        return Miss(Result.UNMATCHED, "recipient_mismatch", address.hash)
    return Tie(address.hash, address, message)
