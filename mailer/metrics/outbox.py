"""Counters and gauges derived from the database at scrape time (SPEC 7).

Every process writes the same database, so counting there agrees across web, worker and
scheduler processes and hosts, and survives restarts, with no bookkeeping on the sending
path. The cost is a few grouped queries per scrape (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from mailer.store.schema import message_events, messages
from mailer.store.status import MessageStatus


class MessageFlowCollector(Collector):
    """How many messages entered each state, why they were suppressed, and queue age."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        self.engine = engine
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        """``mailer_messages_total``, ``mailer_suppressed_total``,
        ``mailer_queue_oldest_age_seconds``."""
        entered = CounterMetricFamily(
            "mailer_messages", "Messages that entered each status, by category (a retried "
            "message enters deferred once per attempt)", labels=["category", "status"])
        suppressed = CounterMetricFamily(
            "mailer_suppressed", "Messages the policy refused, at acceptance or at send "
            "time, by reason", labels=["reason"])
        statuses = sorted(s.value for s in MessageStatus)
        with self.engine.connect() as conn:
            # The history is append-only: one event per state a message enters, so these
            # counts only grow, as a Prometheus counter must.
            for category, status, count in conn.execute(
                select(messages.c.category, message_events.c.type, func.count())
                .select_from(message_events.join(
                    messages, messages.c.id == message_events.c.message_id))
                .where(message_events.c.type.in_(statuses))
                .group_by(messages.c.category, message_events.c.type)
            ):
                entered.add_metric([category, status], count)
            # ``suppressed`` is final, so this count only grows too.
            for reason, count in conn.execute(
                select(messages.c.reason, func.count())
                .where(messages.c.status == MessageStatus.SUPPRESSED)
                .group_by(messages.c.reason)
            ):
                suppressed.add_metric([reason or "unknown"], count)
            oldest = conn.execute(
                select(func.min(func.coalesce(messages.c.send_at, messages.c.created_at)))
                .where(messages.c.status == MessageStatus.QUEUED)
            ).scalar_one()
        yield entered
        yield suppressed
        age = max((self.clock() - oldest).total_seconds(), 0.0) if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "mailer_queue_oldest_age_seconds", "Age of the oldest queued message (since it "
            "was accepted, or since its send_at), 0 when none is queued", value=age)
