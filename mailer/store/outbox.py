"""The outbox: message rows and their compare-and-set state changes (SPEC 5).

The database is the source of truth. Every transition names the state it expects, so two
workers never both claim a row, and a redelivered queue message for a finished row is a
no-op.

Each state change that a service hears about (SPEC 13) writes its event here, in the same
transaction, through :mod:`mailer.events.record`: ``insert_messages`` for messages
suppressed (or failed) at acceptance, ``finish`` and ``transition`` for the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    Row,
    and_,
    bindparam,
    case,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.sql.dml import Update

from mailer.events.record import MessageChange, record_message_changes
from mailer.store import bulk
from mailer.store.schema import message_events, messages
from mailer.store.status import MessageStatus

_CLAIM_COLUMNS = (
    messages.c.id, messages.c.category, messages.c.template, messages.c.topic,
    messages.c.recipient_id, messages.c.to_email, messages.c.to_name, messages.c.to_hash,
    messages.c.data, messages.c.attempts, messages.c.message_id_header, messages.c.created_at,
    messages.c.campaign_id,
)


@dataclass(frozen=True)
class Outcome:
    """The new state of one claimed message after an attempt."""

    id: str
    status: MessageStatus
    reason: str | None = None
    smtp_code: int | None = None
    smtp_response: str | None = None
    next_attempt_at: datetime | None = None
    event: str | None = None
    #: Lower ``attempts`` to at most this: the attempt reached the relay and was held back
    #: by it (SPEC 5: a relay error or throttling is retried, never failed for the
    #: recipient), so it must not count toward the cap meant for messages that kill
    #: their worker. ``None`` leaves the count as the claim set it.
    attempts_at_most: int | None = None


#: finish()'s compare-and-set, built once: constructing it and working out its cache key
#: on every slice of 16 messages cost more than binding the rows.
_FINISH = (
    update(messages)
    .where(messages.c.id == bindparam("b_id"),
           messages.c.status == MessageStatus.SENDING)
    .values(
        status=bindparam("b_status"),
        reason=bindparam("b_reason"),
        smtp_code=bindparam("b_code"),
        smtp_response=bindparam("b_response"),
        next_attempt_at=bindparam("b_next"),
        sent_at=bindparam("b_sent"),
        lease_until=None,
        updated_at=bindparam("b_now"),
        # "attempts > NULL" is NULL, so without a cap the count stays as it is.
        attempts=case((messages.c.attempts > bindparam("b_cap", type_=Integer),
                       bindparam("b_cap", type_=Integer)),
                      else_=messages.c.attempts),
    )
)
_INSERT_EVENTS = insert(message_events)
_INSERT_MESSAGES = insert(messages)


def insert_messages(conn: Connection, rows: Sequence[Mapping[str, Any]], now: datetime) -> None:
    """Insert message rows and their first event in bulk."""
    if not rows:
        return
    # executemany builds the statement from the first row's keys and would silently drop
    # a column only later rows carry: give every row the same keys.
    keys = set().union(*(r.keys() for r in rows))
    uniform = [r if len(r) == len(keys) else {k: r.get(k) for k in keys} for r in rows]
    bulk.executemany(conn, _INSERT_MESSAGES, uniform)
    add_events(conn, [(r["id"], r["status"], r.get("reason")) for r in rows], now)
    record_message_changes(
        conn, [MessageChange(r["id"], r["status"], r.get("reason")) for r in rows], now)


def _claim_statement(locked: bool) -> Update:
    """The claim, built once per dialect (building and keying it per chunk cost ~200 us)."""
    moment = messages.c.updated_at.type
    now = bindparam("b_now", type_=moment)
    # The id list must drive the lookup. A bare status comparison lets SQLite (without
    # table statistics) plan a multi-index OR over ix_messages_status_updated, visiting
    # every queued row of the backlog on each claim; "|| ''" keeps it to the primary key.
    status = messages.c.status.concat("")
    claimable = or_(
        status == MessageStatus.QUEUED,
        and_(status == MessageStatus.DEFERRED, messages.c.next_attempt_at <= now),
        and_(status == MessageStatus.SENDING, messages.c.lease_until < now),
    )
    mine = messages.c.id.in_(bindparam("b_ids", expanding=True))
    if locked:
        # PostgreSQL: rows another worker is claiming right now (a redelivered or re-swept
        # chunk) are skipped instead of waited for: that worker gets them, or, if its
        # transaction fails, the sweeper re-enqueues them. Waiting would serialise workers
        # on each other's claim transactions, and two chunks locking rows in different
        # orders could deadlock. The compare-and-set still decides: a row we lock is
        # checked on its newest version, so no row is claimed twice.
        rows = select(messages.c.id).where(mine, claimable).with_for_update(skip_locked=True)
        mine = messages.c.id.in_(rows.scalar_subquery())
    return (
        update(messages)
        .where(mine, claimable)
        .values(
            status=MessageStatus.SENDING,
            attempts=messages.c.attempts + 1,
            lease_until=bindparam("b_until", type_=moment),
            updated_at=now,
        )
        .returning(*_CLAIM_COLUMNS)
    )


_CLAIM = _claim_statement(locked=False)
_CLAIM_LOCKED = _claim_statement(locked=True)


def claim(
    conn: Connection, ids: Sequence[str], now: datetime, lease: timedelta
) -> list[Row[Any]]:
    """Move claimable rows to ``sending`` with a lease and return them.

    Claimable: ``queued``; ``deferred`` whose retry time has come; ``sending`` whose lease
    ran out (its worker died). Anything else is left alone, which makes redelivery safe.
    """
    if not ids:
        return []
    statement = _CLAIM_LOCKED if conn.dialect.name == "postgresql" else _CLAIM
    return list(conn.execute(statement, {"b_ids": list(ids), "b_now": now,
                                         "b_until": now + lease}))


def renew_lease(
    conn: Connection, ids: Sequence[str], held_until: datetime, until: datetime
) -> set[str]:
    """Extend to ``until`` the lease of those ``ids`` this worker still holds; return them.

    The lease's end is the holder's token: the claim set it to ``held_until``, and a row
    whose lease ran out and that another worker then claimed carries that worker's end
    instead, so it is not renewed here and the caller must not send it.
    """
    if not ids:
        return set()
    result = conn.execute(
        update(messages)
        .where(messages.c.id.in_(list(ids)), messages.c.status == MessageStatus.SENDING,
               messages.c.lease_until == held_until)
        .values(lease_until=until)
        .returning(messages.c.id)
    )
    return {row.id for row in result}


def finish(conn: Connection, outcomes: Iterable[Outcome], now: datetime) -> int:
    """Record attempt outcomes with a compare-and-set on ``sending``; return rows changed."""
    params = [
        {
            "b_id": o.id,
            "b_status": o.status,
            "b_reason": o.reason,
            "b_code": o.smtp_code,
            "b_response": o.smtp_response,
            "b_next": o.next_attempt_at,
            "b_sent": now if o.status == MessageStatus.SENT else None,
            "b_now": now,
            "b_cap": o.attempts_at_most,
        }
        for o in outcomes
    ]
    if not params:
        return 0
    changed = bulk.executemany(conn, _FINISH, params)
    add_events(
        conn,
        [(o.id, o.event or o.status, o.reason or o.smtp_response) for o in outcomes],
        now,
    )
    record_message_changes(
        conn, [MessageChange(o.id, o.status, o.reason, o.smtp_code) for o in outcomes], now)
    return changed


def add_events(
    conn: Connection, events: Sequence[tuple[str, str, str | None]], now: datetime
) -> None:
    """Append history entries ``(message id, type, detail)``."""
    if events:
        bulk.executemany(conn, _INSERT_EVENTS, [
            {"message_id": mid, "at": now, "type": kind, "detail": detail[:500] if detail else None}
            for mid, kind, detail in events
        ])


def transition(
    conn: Connection, message_id: str, expected: Iterable[MessageStatus], status: MessageStatus,
    now: datetime,
    *, reason: str | None = None, event: str | None = None,
) -> bool:
    """Compare-and-set one message from any of ``expected`` to ``status``."""
    result = conn.execute(
        update(messages)
        .where(messages.c.id == message_id, messages.c.status.in_(sorted(expected)))
        .values(status=status, reason=reason, updated_at=now)
    )
    changed = bool(result.rowcount)
    if changed:
        add_events(conn, [(message_id, event or status, reason)], now)
        record_message_changes(conn, [MessageChange(message_id, status, reason)], now)
    return changed


def due_for_sweep(
    conn: Connection, now: datetime, stale_after: timedelta, limit: int = 5000
) -> list[str]:
    """Ids the sweeper should (re-)enqueue, and mark them as just touched.

    Covers rows left ``queued`` (the enqueue after commit was lost: Redis down, process
    killed), ``sending`` rows whose lease expired (worker killed mid-send), ``deferred``
    rows overdue for their retry, and ``scheduled`` rows whose time has come.

    Several schedulers may sweep at once: ``scheduled`` and ``queued`` rows are taken by
    compare-and-set, so each is moved, and enqueued, by one of them only. (Rows a worker
    must claim anyway, ``sending`` and ``deferred``, may be enqueued twice: the claim makes
    the second a no-op.)
    """
    stale = now - stale_after
    candidates = [
        r.id
        for r in conn.execute(
            select(messages.c.id)
            .where(messages.c.status == MessageStatus.SCHEDULED, messages.c.send_at <= now)
            .limit(limit)
        )
    ]
    due_scheduled = [
        r.id
        for r in conn.execute(
            update(messages)
            .where(messages.c.id.in_(candidates), messages.c.status == MessageStatus.SCHEDULED)
            .values(status=MessageStatus.QUEUED, updated_at=now)
            .returning(messages.c.id)
        )
    ] if candidates else []
    if due_scheduled:
        add_events(conn, [(mid, MessageStatus.QUEUED, "send_at reached")
                          for mid in due_scheduled], now)
    # Queued rows are touched so the next sweep does not enqueue them again at once; the
    # stale condition, repeated in the update, makes it a compare-and-set.
    stale_queued = and_(messages.c.status == MessageStatus.QUEUED, messages.c.updated_at < stale)
    requeued = [
        r.id
        for r in conn.execute(
            update(messages)
            .where(messages.c.id.in_(
                select(messages.c.id).where(stale_queued).limit(limit).scalar_subquery()),
                stale_queued)
            .values(updated_at=now)
            .returning(messages.c.id)
        )
    ]
    stuck = [
        r.id
        for r in conn.execute(
            select(messages.c.id)
            .where(
                or_(
                    and_(messages.c.status == MessageStatus.SENDING,
                         messages.c.lease_until < now),
                    and_(messages.c.status == MessageStatus.DEFERRED,
                         messages.c.next_attempt_at < stale),
                )
            )
            .limit(limit)
        )
    ]
    return due_scheduled + requeued + stuck
