"""Outbox transitions are compare-and-set (SPEC 5), on the real test database."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from mailer.runtime import Runtime
from mailer.store.outbox import (
    Outcome,
    claim,
    due_for_sweep,
    finish,
    insert_messages,
    renew_lease,
)
from mailer.store.schema import message_events, messages
from mailer.store.status import MessageStatus as S
from tests.units import message_row, unit_runtime

LEASE = timedelta(minutes=2)


def _status(rt: Runtime, row_id: str) -> str:
    with rt.engine.connect() as conn:
        return str(conn.execute(select(messages.c.status).where(messages.c.id == row_id))
                   .scalar_one())


def test_a_row_is_claimed_once_however_often_its_id_is_delivered(db_url: str) -> None:
    # Given a queued message
    rt = unit_runtime(db_url)
    now = rt.clock()
    row = message_row(rt, S.QUEUED, now)
    with rt.engine.begin() as conn:
        insert_messages(conn, [row], now)
    # When two workers claim its id, one after the other
    with rt.engine.begin() as conn:
        first = claim(conn, [row["id"]], now, LEASE)
    with rt.engine.begin() as conn:
        second = claim(conn, [row["id"]], now, LEASE)
    # Then only the first gets it, with one attempt counted, and it is sending
    assert [r.id for r in first] == [row["id"]] and first[0].attempts == 1
    assert second == []
    assert _status(rt, row["id"]) == S.SENDING
    # And once the lease has run out (its worker died) it may be claimed again
    with rt.engine.begin() as conn:
        again = claim(conn, [row["id"]], now + LEASE + timedelta(seconds=1), LEASE)
    assert [r.attempts for r in again] == [2]


def test_an_outcome_is_recorded_only_over_sending(db_url: str) -> None:
    # Given one message being sent and one already sent
    rt = unit_runtime(db_url)
    now = rt.clock()
    sending = message_row(rt, S.SENDING, now)
    sent = message_row(rt, S.SENT, now)
    with rt.engine.begin() as conn:
        insert_messages(conn, [sending, sent], now)
        # When a worker records "sent" for both (a redelivered chunk)
        changed = finish(conn, [Outcome(sending["id"], S.SENT, smtp_code=250),
                                Outcome(sent["id"], S.SENT, smtp_code=250)], now)
    # Then only the sending row changed, and it has its sent_at
    assert changed == 1
    with rt.engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == sending["id"])).one()
        events = conn.execute(select(message_events.c.type)
                              .where(message_events.c.message_id == sending["id"])
                              .order_by(message_events.c.id)).scalars().all()
    assert (row.status, row.smtp_code, row.lease_until) == ("sent", 250, None)
    assert row.sent_at is not None
    # And the history says what happened, in the stored vocabulary
    assert events == ["sending", "sent"]


def test_the_sweeper_queues_scheduled_rows_when_their_time_comes(db_url: str) -> None:
    # Given a message scheduled for a minute from now
    rt = unit_runtime(db_url)
    now = rt.clock()
    row = message_row(rt, S.SCHEDULED, now, send_at=now + timedelta(minutes=1))
    with rt.engine.begin() as conn:
        insert_messages(conn, [row], now)
        # When the sweeper looks before that time / Then it is left alone
        assert row["id"] not in due_for_sweep(conn, now, timedelta(minutes=5))
    assert _status(rt, row["id"]) == S.SCHEDULED
    # When it looks after that time / Then it is queued and handed back for enqueueing
    with rt.engine.begin() as conn:
        due = due_for_sweep(conn, now + timedelta(minutes=2), timedelta(minutes=5))
    assert row["id"] in due
    assert _status(rt, row["id"]) == S.QUEUED


def test_a_lease_is_renewed_only_by_the_worker_that_holds_it(db_url: str) -> None:
    # Given a message claimed by a worker that then stalled past its lease
    rt = unit_runtime(db_url)
    now = rt.clock()
    row = message_row(rt, S.QUEUED, now)
    with rt.engine.begin() as conn:
        insert_messages(conn, [row], now)
        claim(conn, [row["id"]], now, LEASE)
    # And a second worker that claimed it after the lease ran out
    later = now + LEASE + timedelta(seconds=1)
    with rt.engine.begin() as conn:
        assert len(claim(conn, [row["id"]], later, LEASE)) == 1
    # When the first worker tries to renew the lease it once held
    with rt.engine.begin() as conn:
        first = renew_lease(conn, [row["id"]], now + LEASE, later + LEASE)
    # Then it is refused (the row is no longer its to send), and the holder's succeeds
    assert first == set()
    with rt.engine.begin() as conn:
        holder = renew_lease(conn, [row["id"]], later + LEASE, later + 2 * LEASE)
    assert holder == {row["id"]}
    with rt.engine.connect() as conn:
        lease = conn.execute(select(messages.c.lease_until)
                             .where(messages.c.id == row["id"])).scalar_one()
    assert lease == later + 2 * LEASE


def test_two_sweepers_enqueue_a_stale_queued_row_once(db_url: str) -> None:
    # Given a message left queued (its enqueue was lost) and one due from the schedule
    rt = unit_runtime(db_url)
    now = rt.clock()
    old = now - timedelta(minutes=10)
    stale = message_row(rt, S.QUEUED, old, updated_at=old)
    due = message_row(rt, S.SCHEDULED, old, send_at=now - timedelta(seconds=1))
    with rt.engine.begin() as conn:
        insert_messages(conn, [stale, due], old)
    # When two schedulers sweep at the same moment
    with rt.engine.begin() as conn:
        first = due_for_sweep(conn, now, timedelta(seconds=30))
    with rt.engine.begin() as conn:
        second = due_for_sweep(conn, now, timedelta(seconds=30))
    # Then the first hands both back for enqueueing and the second neither
    assert {stale["id"], due["id"]} <= set(first)
    assert {stale["id"], due["id"]}.isdisjoint(second)
    # And the scheduled row's history says "queued" once
    with rt.engine.connect() as conn:
        events = conn.execute(select(message_events.c.type)
                              .where(message_events.c.message_id == due["id"])).scalars().all()
    assert events.count("queued") == 1


@pytest.mark.postgresql_only  # row locks: SQLite serialises whole write transactions
def test_a_claim_skips_rows_another_worker_is_claiming(db_url: str) -> None:
    assert db_url.startswith("postgresql")
    # Given two queued messages, and a worker in the middle of claiming the first
    rt = unit_runtime(db_url)
    now = rt.clock()
    a, b = message_row(rt, S.QUEUED, now), message_row(rt, S.QUEUED, now)
    with rt.engine.begin() as conn:
        insert_messages(conn, [a, b], now)
    first = rt.engine.connect()
    holding = first.begin()
    assert [r.id for r in claim(first, [a["id"]], now, LEASE)] == [a["id"]]
    try:
        # When a second worker claims both (a redelivered chunk), from another thread
        got: list[str] = []
        second = threading.Thread(target=lambda: got.extend(
            _claim_ids(rt, [a["id"], b["id"]], now)))
        second.start()
        second.join(timeout=10)
        # Then it does not wait for the first: it gets the free row at once
        assert not second.is_alive()
        assert got == [b["id"]]
    finally:
        holding.commit()
        first.close()
    # And the first worker's claim stands
    assert _status(rt, a["id"]) == S.SENDING


def _claim_ids(rt: Runtime, ids: list[str], now: datetime) -> list[str]:
    with rt.engine.begin() as conn:
        return [r.id for r in claim(conn, ids, now, LEASE)]
