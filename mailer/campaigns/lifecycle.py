"""Campaigns: the stored row, its state machine and what it counts (SPEC 7, 9).

::

    scheduled --(scheduler, on time)--> running --(fan-out done, nothing pending)--> completed
    scheduled --(scheduler, too late)--> paused (late) --resume--> scheduled (late allowed)
    scheduled | running --pause--> paused --resume--> running (or scheduled, if never started)
    scheduled | running | paused --cancel--> cancelled

Every transition is a compare-and-set on the current status, so a second scheduler, a
restarted one, or an API call racing the scheduler can never apply a step twice. Pausing
moves the campaign's unsent messages to ``held`` and resuming moves them back; cancelling
makes them ``cancelled``. Messages already handed to SMTP (``sending``) finish normally.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Row, and_, bindparam, func, insert, literal, select, update

from mailer.errors import Conflict, NotFound
from mailer.events.record import record_campaign_completed
from mailer.store.outbox import add_events
from mailer.store.schema import campaigns, consent_events, message_events, messages
from mailer.store.status import CANCELLABLE, HOLDABLE, PENDING, QUEUED_LIKE, MessageStatus
from mailer.times import iso
from suppression.policy import Category


class CampaignStatus(StrEnum):
    """Where a campaign stands (SPEC 7, 9); the diagram above shows the moves."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    COMPLETED = "completed"


#: States a campaign never leaves.
FINISHED = frozenset({CampaignStatus.CANCELLED, CampaignStatus.COMPLETED})
#: Message states a campaign's counts show one to one, in this order; the rest of
#: :data:`~mailer.store.status.QUEUED_LIKE` is shown together as "queued".
_COUNTED = (MessageStatus.SENT, MessageStatus.SUPPRESSED, MessageStatus.FAILED,
            MessageStatus.BOUNCED, MessageStatus.COMPLAINED, MessageStatus.UNKNOWN,
            MessageStatus.CANCELLED, MessageStatus.HELD)
_QUEUED = MessageStatus.QUEUED.value


class CampaignStateError(Conflict):
    """Raised when pause, resume or cancel does not apply to the campaign's current state."""

    code = "invalid_campaign_state"


@dataclass(frozen=True)
class NewCampaign:
    """A campaign as the API accepted it (or the system: a policy update, SPEC 14)."""

    name: str
    template: str
    topic: str | None
    send_at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)
    audience: Mapping[str, Any] | None = None
    rate_per_minute: int | None = None
    #: The template's category: promotions, or service alerts to active accounts.
    category: Category = Category.PROMOTION


def create(conn: Connection, new: NewCampaign, api_key_id: int | None, now: datetime) -> str:
    """Store a ``scheduled`` campaign and return its id."""
    campaign_id = uuid.uuid4().hex
    conn.execute(insert(campaigns).values(
        id=campaign_id, name=new.name, template=new.template, topic=new.topic,
        category=new.category.value,
        data=dict(new.data), audience=dict(new.audience) if new.audience else None,
        send_at=new.send_at, rate_per_minute=new.rate_per_minute,
        status=CampaignStatus.SCHEDULED,
        late=False, allow_late=False, api_key_id=api_key_id, last_recipient_id=0, written=0,
        created_at=now, updated_at=now,
    ))
    return campaign_id


def get(conn: Connection, campaign_id: str) -> Row[Any]:
    """The campaign row, or :class:`NotFound`."""
    row = conn.execute(select(campaigns).where(campaigns.c.id == campaign_id)).first()
    if row is None:
        raise NotFound(f"no campaign {campaign_id!r}")
    return row


def recent(conn: Connection, limit: int, status: str | None = None) -> list[Row[Any]]:
    """The newest campaigns first."""
    query = select(campaigns).order_by(campaigns.c.created_at.desc(), campaigns.c.id).limit(limit)
    if status is not None:
        query = query.where(campaigns.c.status == status)
    return list(conn.execute(query))


def _set_status(
    conn: Connection, campaign_id: str, expected: Sequence[CampaignStatus], now: datetime,
    **values: Any,
) -> bool:
    """Compare-and-set the campaign's status; True when this call made the change."""
    result = conn.execute(
        update(campaigns)
        .where(campaigns.c.id == campaign_id, campaigns.c.status.in_(list(expected)))
        .values(updated_at=now, **values)
    )
    return bool(result.rowcount)


def _move_messages(
    conn: Connection, campaign_id: str, expected: frozenset[MessageStatus],
    status: MessageStatus, now: datetime, detail: str, reason: str | None = None,
) -> int:
    """Compare-and-set every matching message of the campaign; log one event each."""
    result = conn.execute(
        update(messages)
        .where(messages.c.campaign_id == campaign_id, messages.c.status.in_(sorted(expected)))
        .values(status=status, reason=reason, updated_at=now)
    )
    moved = int(result.rowcount or 0)
    if moved:
        # Set-based: a pause of 200 000 messages must not pull their ids into memory. The
        # rows just moved are the ones in the new state stamped with this exact moment.
        conn.execute(insert(message_events).from_select(
            ["message_id", "at", "type", "detail"],
            select(messages.c.id, literal(now, messages.c.updated_at.type),
                   literal(status.value),
                   literal(detail))
            .where(messages.c.campaign_id == campaign_id, messages.c.status == status,
                   messages.c.updated_at == now),
        ))
    return moved


def pause(conn: Connection, campaign_id: str, now: datetime) -> int:
    """Pause a scheduled or running campaign and hold its unsent messages; return held."""
    row = get(conn, campaign_id)
    if row.status == CampaignStatus.PAUSED:
        return 0  # idempotent: a second click changes nothing
    if not _set_status(conn, campaign_id, (CampaignStatus.SCHEDULED, CampaignStatus.RUNNING),
                       now, status=CampaignStatus.PAUSED, paused_at=now):
        raise CampaignStateError(f"a {get(conn, campaign_id).status} campaign cannot be paused")
    # The campaign row is updated (and, on PostgreSQL, locked) before the messages, so a
    # fan-out batch committing concurrently is either refused by its own compare-and-set or
    # fully visible to this statement: nothing it wrote escapes the hold.
    return _move_messages(conn, campaign_id, HOLDABLE, MessageStatus.HELD, now,
                          "campaign paused")


def resume(conn: Connection, campaign_id: str, now: datetime) -> int:
    """Resume a paused campaign; return how many held messages went back to ``queued``.

    A campaign that never started (paused while scheduled, or found too late by the
    scheduler) goes back to ``scheduled`` with lateness allowed: the resume is the explicit
    decision SPEC 9 asks for. The caller enqueues the released messages after commit.
    """
    row = get(conn, campaign_id)
    if row.status in (CampaignStatus.RUNNING, CampaignStatus.SCHEDULED):
        return 0
    if row.started_at is None:
        changed = _set_status(conn, campaign_id, (CampaignStatus.PAUSED,), now,
                              status=CampaignStatus.SCHEDULED, late=False, allow_late=True,
                              paused_at=None)
    else:
        changed = _set_status(conn, campaign_id, (CampaignStatus.PAUSED,), now,
                              status=CampaignStatus.RUNNING, paused_at=None, next_batch_at=None)
    if not changed:
        raise CampaignStateError(f"a {get(conn, campaign_id).status} campaign cannot be resumed")
    return _move_messages(conn, campaign_id, frozenset({MessageStatus.HELD}),
                          MessageStatus.QUEUED, now, "campaign resumed")


def cancel(conn: Connection, campaign_id: str, now: datetime) -> int:
    """Cancel the campaign and every message not yet handed to SMTP; return cancelled."""
    unfinished = (CampaignStatus.SCHEDULED, CampaignStatus.RUNNING, CampaignStatus.PAUSED)
    if not _set_status(conn, campaign_id, unfinished, now,
                       status=CampaignStatus.CANCELLED, finished_at=now):
        row = get(conn, campaign_id)
        if row.status == CampaignStatus.CANCELLED:
            return 0
        raise CampaignStateError(f"a {row.status} campaign cannot be cancelled")
    return _move_messages(conn, campaign_id, CANCELLABLE, MessageStatus.CANCELLED, now,
                          "campaign cancelled", reason="campaign_cancelled")


def queued_ids(conn: Connection, campaign_id: str, page: int = 1000) -> Iterator[list[str]]:
    """The campaign's ``queued`` message ids, streamed in pages."""
    # A server-side cursor on PostgreSQL: releasing 200 000 held messages never holds all
    # their ids at once.
    result = conn.execution_options(yield_per=page).execute(
        select(messages.c.id)
        .where(messages.c.campaign_id == campaign_id, messages.c.status == MessageStatus.QUEUED))
    for part in result.partitions():
        yield [r.id for r in part]


@dataclass(frozen=True)
class SendContext:
    """What the worker needs to know about a message's campaign at send time."""

    status: str
    data: Mapping[str, Any]

    def stop(self) -> tuple[MessageStatus, str | None] | None:
        """The state a claimed message takes instead of being sent, if the campaign says so.

        A pause or cancel that commits before the send-time check wins, as an unsubscribe
        does: this catches messages a pause could not hold (in a worker's hands at that
        moment, or retried later) without ever sending them.
        """
        if self.status == CampaignStatus.PAUSED:
            return MessageStatus.HELD, None
        if self.status == CampaignStatus.CANCELLED:
            return MessageStatus.CANCELLED, "campaign_cancelled"
        return None


# Read for every chunk of campaign mail a worker sends: built once.
_SEND_CONTEXT = select(campaigns.c.id, campaigns.c.status, campaigns.c.data).where(
    campaigns.c.id.in_(bindparam("ids", expanding=True)))


def send_context(conn: Connection, campaign_ids: Sequence[str]) -> dict[str, SendContext]:
    """Status and shared variables (merged in at render time) of each campaign."""
    if not campaign_ids:
        return {}
    rows = conn.execute(_SEND_CONTEXT, {"ids": list(campaign_ids)})
    return {r.id: SendContext(r.status, dict(r.data or {})) for r in rows}


def release_strays(conn: Connection, now: datetime, limit: int = 1000) -> list[str]:
    """Queue again held messages of running campaigns; return their ids to enqueue.

    A worker that read "paused" just before a resume committed holds its message after
    the resume released the others (PostgreSQL runs the two concurrently); this sweep
    makes sure such a message is sent rather than forgotten.
    """
    running = select(campaigns.c.id).where(campaigns.c.status == CampaignStatus.RUNNING)
    ids = [r.id for r in conn.execute(
        select(messages.c.id)
        .where(messages.c.campaign_id.in_(running), messages.c.status == MessageStatus.HELD)
        .limit(limit))]
    if not ids:
        return []
    released = [r.id for r in conn.execute(
        update(messages)
        .where(messages.c.id.in_(ids), messages.c.status == MessageStatus.HELD)
        .values(status=MessageStatus.QUEUED, updated_at=now)
        .returning(messages.c.id))]
    add_events(conn, [(i, MessageStatus.QUEUED, "campaign running") for i in released], now)
    return released


def complete_finished(conn: Connection, now: datetime) -> list[str]:
    """Mark running campaigns whose fan-out is done and messages are final ``completed``."""
    done: list[str] = []
    candidates = conn.execute(
        select(campaigns.c.id).where(campaigns.c.status == CampaignStatus.RUNNING,
                                     campaigns.c.fanned_out_at.is_not(None))
    ).all()
    for row in candidates:
        pending = conn.execute(
            select(messages.c.id)
            .where(messages.c.campaign_id == row.id, messages.c.status.in_(sorted(PENDING)))
            .limit(1)
        ).first()
        if pending is None and _set_status(conn, row.id, (CampaignStatus.RUNNING,), now,
                                           status=CampaignStatus.COMPLETED, finished_at=now):
            done.append(row.id)
    if done:
        # SPEC 13: campaign.completed, in the transaction that completes it.
        record_campaign_completed(conn, [get(conn, i) for i in done],
                                  lambda rows: counts(conn, rows), now)
    return done


def counts(conn: Connection, rows: Sequence[Row[Any]]) -> dict[str, dict[str, Any]]:
    """Per campaign: message counts by state, suppressions by reason, and unsubscribes."""
    ids = [r.id for r in rows]
    out: dict[str, dict[str, Any]] = {}
    by_reason: dict[str, dict[str, int]] = defaultdict(dict)
    for row in rows:
        out[row.id] = {key: 0 for key in (_QUEUED, *_COUNTED, "unsubscribed")}
    if not ids:
        return out
    grouped = conn.execute(
        select(messages.c.campaign_id, messages.c.status, messages.c.reason, func.count())
        .where(messages.c.campaign_id.in_(ids))
        .group_by(messages.c.campaign_id, messages.c.status, messages.c.reason)
    )
    for campaign_id, status, reason, n in grouped:
        bucket = out[campaign_id]
        key = _QUEUED if status in QUEUED_LIKE else status
        bucket[key] = bucket.get(key, 0) + n
        if status == MessageStatus.SUPPRESSED:
            reasons = by_reason[campaign_id]
            reasons[reason or "unknown"] = reasons.get(reason or "unknown", 0) + n
    # Unsubscribed: people who revoked the campaign's topic after its mail reached them.
    # The token in the link names recipient and topic only, so this is the honest proxy.
    unsubscribed = conn.execute(
        select(messages.c.campaign_id, func.count(func.distinct(messages.c.recipient_id)))
        .join(consent_events, and_(
            consent_events.c.recipient_id == messages.c.recipient_id,
            consent_events.c.topic == messages.c.topic,
            consent_events.c.granted.is_(False),
            consent_events.c.occurred_at >= messages.c.sent_at,
        ))
        .where(messages.c.campaign_id.in_(ids), messages.c.sent_at.is_not(None))
        .group_by(messages.c.campaign_id)
    )
    for campaign_id, n in unsubscribed:
        out[campaign_id]["unsubscribed"] = n
    for row in rows:
        bucket = out[row.id]
        written = sum(bucket[k] for k in (_QUEUED, *_COUNTED))
        audience = row.audience_count if row.audience_count is not None else written
        bucket["audience"] = audience
        # Recipients of the snapshot the fan-out has not reached yet.
        bucket["pending"] = max(audience - written, 0) if row.fanned_out_at is None else 0
        bucket["suppressed_by_reason"] = dict(sorted(by_reason[row.id].items()))
    return out


def view(row: Row[Any], counted: Mapping[str, Any]) -> dict[str, Any]:
    """A campaign as the API shows it (no addresses, only counts)."""
    numbers = {k: v for k, v in counted.items() if k != "suppressed_by_reason"}
    return {
        "id": row.id, "name": row.name, "status": row.status, "template": row.template,
        "category": row.category, "topic": row.topic, "send_at": iso(row.send_at),
        "rate_per_minute": row.rate_per_minute,
        "audience": row.audience, "late": bool(row.late), "created_at": iso(row.created_at),
        "started_at": iso(row.started_at), "paused_at": iso(row.paused_at),
        "fanned_out_at": iso(row.fanned_out_at), "finished_at": iso(row.finished_at),
        "counts": numbers,
        "suppressed_by_reason": dict(counted.get("suppressed_by_reason", {})),
    }
