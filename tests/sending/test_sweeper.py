"""The scheduler's sweeper: what the queue lost comes back; temporary blocks expire."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from mailer.runtime import Runtime
from mailer.sending.queue import ListEnqueuer
from mailer.sending.sweeper import sweep
from mailer.store.outbox import insert_messages
from mailer.store.recipients import add_suppression
from mailer.store.schema import messages, suppressions


def row(rt: Runtime, status: str, **extra: Any) -> dict[str, Any]:
    now = rt.clock()
    row_id, header = rt.new_message_id()
    base = {
        "id": row_id, "api_key_id": 0, "category": "registration_confirmation",
        "template": "registration_confirmation", "topic": None, "recipient_id": None,
        "to_email": "sweep@example.org", "to_name": None, "to_hash": secrets.token_hex(32),
        "data": {}, "status": status, "reason": None, "attempts": 0,
        "message_id_header": header, "created_at": now, "updated_at": now, "send_at": None,
    }
    base.update(extra)
    return base


def test_sweep_reenqueues_lost_work_and_expires_soft_bounce_blocks(runtime: Any) -> None:
    # Given a runtime whose queue we can inspect
    held = ListEnqueuer()
    rt = Runtime(runtime.settings, runtime.engine, runtime.catalogue, held)
    now = rt.clock()
    old = now - timedelta(minutes=10)
    rows = {
        "stale_queued": row(rt, "queued", updated_at=old),
        "fresh_queued": row(rt, "queued"),
        "due_scheduled": row(rt, "scheduled", send_at=now - timedelta(seconds=1)),
        "future_scheduled": row(rt, "scheduled", send_at=now + timedelta(hours=1)),
        "expired_lease": row(rt, "sending", lease_until=now - timedelta(seconds=1)),
        "live_lease": row(rt, "sending", lease_until=now + timedelta(minutes=1)),
        "overdue_retry": row(rt, "deferred", next_attempt_at=old),
        "sent": row(rt, "sent", updated_at=old),
    }
    # Keyed address hashes are 64 hex digits (HMAC-SHA256), like every real entry
    soft_hash, hard_hash = secrets.token_hex(32), secrets.token_hex(32)
    with rt.engine.begin() as conn:
        insert_messages(conn, list(rows.values()), now)
        add_suppression(conn, None, soft_hash, "all", "soft_bounce_limit", "test", old,
                        expires_at=now - timedelta(seconds=1))
        add_suppression(conn, None, hard_hash, "all", "hard_bounce", "test", old)

    # When the sweeper runs
    report = sweep(rt)

    # Then exactly the lost, overdue and due messages are enqueued again
    enqueued = {mid for batch, _ in held.batches for mid in batch}
    wanted = {rows[k]["id"] for k in ("stale_queued", "due_scheduled", "expired_lease",
                                      "overdue_retry")}
    missing = [k for k, r in rows.items() if r["id"] in wanted - enqueued]
    assert not missing, missing
    untouched = {rows[k]["id"] for k in ("fresh_queued", "future_scheduled", "live_lease",
                                         "sent")}
    assert not (untouched & enqueued)
    assert report.enqueued >= len(wanted)
    with rt.engine.connect() as conn:
        status = dict(conn.execute(select(messages.c.id, messages.c.status).where(
            messages.c.id.in_([r["id"] for r in rows.values()]))).all())
        left = {r.email_hash for r in conn.execute(select(suppressions.c.email_hash).where(
            suppressions.c.email_hash.in_([soft_hash, hard_hash])))}
    assert status[rows["due_scheduled"]["id"]] == "queued"
    assert status[rows["future_scheduled"]["id"]] == "scheduled"
    # And the expired soft-bounce block is gone while the hard bounce stays for good
    assert left == {hard_hash}

    # And a second sweep right away does not enqueue the stale row again
    held.batches.clear()
    sweep(rt)
    again = {mid for batch, _ in held.batches for mid in batch}
    assert rows["stale_queued"]["id"] not in again
