"""``mailer_webhook_deliveries_total{result}`` (SPEC 7), read from the database at scrape.

The delivery thread adds each attempt's result to ``outbound_delivery_counts`` in the
transaction that records it, so the counter agrees across processes, survives restarts,
and keeps growing after old delivery rows are pruned, as a Prometheus counter must.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, select

from mailer.events.delivery import Result
from mailer.store.schema import outbound_delivery_counts


def deliveries_total(conn: Connection) -> dict[str, int]:
    """Attempts so far by result, every result present (zero included)."""
    counts: dict[str, int] = {r.value: 0 for r in Result}
    for result, count in conn.execute(select(outbound_delivery_counts.c.result,
                                             outbound_delivery_counts.c.count)):
        counts[result] = int(count)
    return counts


class DeliveriesCollector(Collector):
    """Event webhook delivery attempts by result."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        """``mailer_webhook_deliveries_total{result}``."""
        with self.engine.connect() as conn:
            counts = deliveries_total(conn)
        family = CounterMetricFamily(
            "mailer_webhook_deliveries", "Outbound event webhook attempts by result "
            "(delivered; failed and refused are retried; dead: given up after 24 hours)",
            labels=["result"])
        for result, count in sorted(counts.items()):
            family.add_metric([result], count)
        yield family
