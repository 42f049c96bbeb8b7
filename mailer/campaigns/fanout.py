"""Fan-out: turn a running campaign's audience into outbox rows, one batch at a time.

The audience is read up to the highest recipient id at the moment the campaign started,
so it is a snapshot (:mod:`mailer.campaigns.audience`). Per batch, the policy is applied,
the messages are inserted in bulk, and the cursor advances by compare-and-set in the same
transaction: a batch is written exactly once however many schedulers run or restart.

The worker decides again right before SMTP, so an unsubscribe that lands after the
fan-out still wins (SPEC 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, and_, select, update

from mailer.campaigns import lifecycle as model
from mailer.campaigns.audience import (
    DEFAULT_BATCH,
    AudienceFilter,
    audience_batch,
    campaign_topic,
    decide_batch,
)
from mailer.campaigns.lifecycle import CampaignStatus
from mailer.mail.templates import Template
from mailer.runtime import Runtime
from mailer.store.outbox import insert_messages
from mailer.store.schema import campaigns, messages
from mailer.store.status import MessageStatus
from suppression.policy import Category, Decision


def batch_size(rate_per_minute: int | None, default: int = DEFAULT_BATCH) -> int:
    """Recipients per batch: about one second's worth when the campaign is rate-limited."""
    if not rate_per_minute:
        return default
    return max(1, min(default, rate_per_minute // 60))


def message_data(row: Row[Any], variables: frozenset[str] | None) -> dict[str, Any]:
    """The per-recipient variables a message stores: only the profile fields it reads.

    The campaign's shared ``data`` is not copied into each row; the worker merges it in
    at render time (a 5 kB body times 200 000 recipients would be a gigabyte).
    """
    wanted = variables if variables is not None else frozenset({"name", "email", "attributes"})
    data: dict[str, Any] = {}
    if "name" in wanted and row.name:
        data["name"] = row.name
    if "email" in wanted:
        data["email"] = row.email
    if "attributes" in wanted:
        data["attributes"] = dict(row.attributes or {})
    return data


@dataclass
class BatchResult:
    """What one fan-out step did."""

    written: int = 0
    queued: int = 0
    advanced: bool = False  # the cursor moved (a batch of duplicates writes nothing)
    done: bool = False
    waiting_until: datetime | None = None
    stopped: bool = False  # the campaign is not running (paused, cancelled) or lost a race


def fan_out_batch(rt: Runtime, campaign_id: str, batch: int = DEFAULT_BATCH) -> BatchResult:
    """Write and enqueue the next batch of a running campaign."""
    now = rt.clock()
    # Read and decide on a read-only snapshot, then write in a short transaction guarded
    # by the cursor: on SQLite the write lock is one for the whole database, and holding
    # it through the audience query and the policy would hold up every worker and the
    # API for the whole batch. The guard makes the snapshot safe to act on: the batch is
    # written only if the cursor has not moved since (no other batch was written, so the
    # per-address check still holds) and the campaign still runs.
    with rt.engine.connect() as conn:
        c = model.get(conn, campaign_id)
        if c.status != CampaignStatus.RUNNING or c.fanned_out_at is not None:
            return BatchResult(stopped=True)
        if c.next_batch_at is not None and c.next_batch_at > now:
            return BatchResult(waiting_until=c.next_batch_at)
        flt = AudienceFilter.parse(c.audience)
        rows, cursor = audience_batch(conn, flt, c.last_recipient_id, c.max_recipient_id or 0,
                                       batch_size(c.rate_per_minute, batch))
        if rows:
            rows = _first_per_address(conn, campaign_id, rows)
            topic = campaign_topic(conn, c.topic)
            decisions = decide_batch(rt, conn, topic, rows, now, Category(c.category))
    guard = and_(campaigns.c.id == campaign_id, campaigns.c.status == CampaignStatus.RUNNING,
                 campaigns.c.last_recipient_id == c.last_recipient_id)
    if not rows:
        # The snapshot is exhausted: the exact audience is what was written.
        with rt.engine.begin() as conn:
            done = conn.execute(update(campaigns).where(guard).values(
                last_recipient_id=cursor, fanned_out_at=now, audience_count=c.written,
                updated_at=now))
        return BatchResult(done=True) if done.rowcount else BatchResult(stopped=True)
    # Looked up outside the snapshot: a stored template is read on a connection of its own.
    template = rt.catalogue.get(c.template)
    message_rows = _message_rows(rt, c, template, rows, decisions, now)
    queued = [m["id"] for m in message_rows if m["status"] == MessageStatus.QUEUED]
    pause_for = timedelta(0)
    if c.rate_per_minute:
        # Pace by messages that will be sent; suppressed ones cost the relay nothing.
        pause_for = timedelta(seconds=len(queued) * 60 / c.rate_per_minute)
    with rt.engine.begin() as conn:
        # Compare-and-set first: on PostgreSQL this also locks the campaign row, so a
        # pause either waits for this batch and then holds it, or wins and refuses it.
        moved = conn.execute(update(campaigns).where(guard).values(
            last_recipient_id=cursor, written=campaigns.c.written + len(message_rows),
            next_batch_at=now + pause_for if pause_for else None, updated_at=now))
        if not moved.rowcount:
            return BatchResult(stopped=True)
        insert_messages(conn, message_rows, now)
    if queued:
        # After commit (SPEC 5): a lost enqueue is re-sent by the outbox sweeper.
        rt.enqueuer.enqueue(queued)
    return BatchResult(written=len(message_rows), queued=len(queued), advanced=True)


def _first_per_address(conn: Connection, campaign_id: str,
                       rows: Sequence[Row[Any]]) -> list[Row[Any]]:
    """Drop a recipient whose address already has a message in this campaign."""
    hashes = sorted({r.email_hash for r in rows})
    seen = {r.to_hash for r in conn.execute(
        select(messages.c.to_hash).where(messages.c.campaign_id == campaign_id,
                                         messages.c.to_hash.in_(hashes)))}
    kept = []
    for row in rows:  # ordered by id: the oldest profile of an address is the one kept
        if row.email_hash not in seen:
            seen.add(row.email_hash)
            kept.append(row)
    return kept


def _message_rows(
    rt: Runtime, c: Row[Any], template: Template, rows: Sequence[Row[Any]],
    decisions: Sequence[Decision], now: datetime,
) -> list[dict[str, Any]]:
    variables = template.variables
    needs_name = "name" in template.required and "name" not in (c.data or {})
    out = []
    for row, decision, (row_id, message_id) in zip(rows, decisions,
                                                   rt.new_message_ids(len(rows)), strict=True):
        status, reason = MessageStatus.QUEUED, None
        if not decision.allowed:
            status = MessageStatus.SUPPRESSED
            reason = decision.reason.value if decision.reason else None
        elif needs_name and not row.name:
            # A template that requires a name is never sent with a blank one.
            status, reason = MessageStatus.FAILED, "missing_variable"
        out.append({
            "id": row_id, "api_key_id": c.api_key_id, "campaign_id": c.id,
            "category": c.category, "template": c.template, "topic": c.topic,
            "recipient_id": row.id, "to_email": row.email, "to_name": row.name,
            "to_hash": row.email_hash, "data": message_data(row, variables), "status": status,
            "reason": reason, "attempts": 0, "message_id_header": message_id,
            "created_at": now, "updated_at": now, "send_at": None,
        })
    return out
