"""A worker sends only rows it still holds: a slow chunk renews its lease (SPEC 5).

A chunk of 100 ids is sent in slices of 16. If sending takes long (a slow relay, a paced
domain), the lease taken at the claim runs out, the sweeper hands the rest to another
worker, and both would send them. The dispatcher renews the lease once half of it is
spent, and drops the rows another worker took meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from mailer.mail.mime import Envelope, MessageBuilder
from mailer.runtime import Runtime
from mailer.sending.dispatch import Dispatcher
from mailer.smtp.replies import Outcome as SmtpOutcome
from mailer.smtp.replies import SendResult
from mailer.store.outbox import claim, insert_messages
from mailer.store.schema import messages
from mailer.store.status import MessageStatus as S
from tests.units import message_row, unit_runtime

LEASE = timedelta(seconds=60)


class SlowRelay:
    """Accepts everything; after each slice it lets ``between`` run (time passes)."""

    def __init__(self, between: Callable[[int], None]) -> None:
        self.between = between
        self.sent: list[str] = []

    def send_many(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        """Record the recipients, then let time pass."""
        self.sent += [e.recipients[0] for e in envelopes]
        self.between(len(self.sent))
        return [SendResult(SmtpOutcome.SENT, 250, "250 2.0.0 Ok") for _ in envelopes]


def _setup(db_url: str, count: int) -> tuple[Runtime, list[datetime], list[str]]:
    rt = unit_runtime(db_url, MAILER_SEND_LEASE="60s")
    clock = [rt.clock()]
    rt.clock = lambda: clock[0]
    rows = [message_row(rt, S.QUEUED, clock[0], to_email=f"lease{n}@example.org",
                        data={"name": "L", "confirm_url": "https://example.test/c"})
            for n in range(count)]
    with rt.engine.begin() as conn:
        insert_messages(conn, rows, clock[0])
    return rt, clock, [r["id"] for r in rows]


def _states(rt: Runtime, ids: list[str]) -> dict[str, Any]:
    with rt.engine.connect() as conn:
        return {r.id: r for r in conn.execute(
            select(messages.c.id, messages.c.status, messages.c.lease_until)
            .where(messages.c.id.in_(ids)))}


def test_rows_another_worker_took_after_the_lease_ran_out_are_not_sent(db_url: str) -> None:
    # Given a chunk of 48 messages (three slices)
    rt, clock, ids = _setup(db_url, 48)
    address = {i: f"lease{n}@example.org" for n, i in enumerate(ids)}
    taken_at: list[datetime] = []
    taken: list[str] = []

    def stall_then_lose_the_rest(sent: int) -> None:
        # When the first slice takes longer than the lease, and meanwhile another worker
        # claims the other 32 (the sweeper re-enqueued them when the lease ran out). The
        # claim's order is the database's (PostgreSQL's SKIP LOCKED returns rows as it
        # finds them), so "the other 32" are the ones this worker has not sent yet.
        if sent == 16:
            clock[0] += LEASE + timedelta(seconds=1)
            taken_at.append(clock[0])
            taken.extend(i for i in ids if address[i] not in relay.sent)
            with rt.engine.begin() as conn:
                assert len(claim(conn, taken, clock[0], LEASE)) == 32

    relay = SlowRelay(stall_then_lose_the_rest)
    builder = MessageBuilder(rt.settings.mail_from, None)
    Dispatcher(rt, relay, builder).run(ids)
    # Then this worker sent the first slice only, each message once
    assert len(relay.sent) == 16 and len(set(relay.sent)) == 16
    assert len(taken) == 32
    states = _states(rt, ids)
    assert all(states[i].status == S.SENT for i in ids if i not in taken)
    # And the other 32 are left to the worker that holds them, under its lease
    assert all(states[i].status == S.SENDING for i in taken)
    assert {states[i].lease_until for i in taken} == {taken_at[0] + LEASE}


def test_a_slow_chunk_nobody_else_took_is_sent_in_full(db_url: str) -> None:
    # Given a chunk of 48 messages whose slices each take 60 % of the lease
    rt, clock, ids = _setup(db_url, 48)

    def slow(sent: int) -> None:
        clock[0] += LEASE * 0.6

    relay = SlowRelay(slow)
    # When one worker sends it, renewing the lease as it goes
    Dispatcher(rt, relay, MessageBuilder(rt.settings.mail_from, None)).run(ids)
    # Then every message is sent once: the lease outlived the chunk
    assert len(relay.sent) == 48
    assert {s.status for s in _states(rt, ids).values()} == {S.SENT}
