"""The scheduler's periodic jobs: the outbox sweeper and other housekeeping."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete

from mailer.runtime import Runtime
from mailer.sending.accept import IDEMPOTENCY_TTL
from mailer.store.outbox import due_for_sweep
from mailer.store.schema import idempotency_keys, suppressions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    enqueued: int
    expired_suppressions: int


def sweep(rt: Runtime, now: datetime | None = None) -> SweepReport:
    """Re-enqueue what the queue may have lost, and expire what has run out."""
    now = now or rt.clock()
    with rt.engine.begin() as conn:
        ids = due_for_sweep(conn, now, rt.settings.sweep_interval)
        conn.execute(delete(idempotency_keys).where(
            idempotency_keys.c.created_at < now - IDEMPOTENCY_TTL))
        # Only temporary entries (soft-bounce limits) expire; the list itself is never
        # purged (SPEC 4).
        expired = conn.execute(delete(suppressions).where(
            suppressions.c.expires_at.is_not(None), suppressions.c.expires_at <= now))
    if ids:
        rt.enqueuer.enqueue(ids)
    return SweepReport(enqueued=len(ids), expired_suppressions=int(expired.rowcount or 0))
