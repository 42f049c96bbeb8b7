"""Operations endpoints: Prometheus ``/metrics`` and aggregate ``/v1/stats`` (no personal data)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from mailer.api.deps import runtime, scoped
from mailer.errors import ValidationFailed
from mailer.keys import ApiKey
from mailer.runtime import Runtime
from mailer.schema import messages, suppressions

router = APIRouter(tags=["operations"])


class OutboxCollector(Collector):
    """Counts read from the database at scrape time, so web and worker processes agree."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Messages by category and status, and suppressions by reason."""
        by_status = GaugeMetricFamily("mailer_messages", "Messages in the outbox",
                                      labels=["category", "status"])
        by_reason = GaugeMetricFamily("mailer_suppressions", "Suppression list entries",
                                      labels=["reason"])
        with self.rt.engine.connect() as conn:
            for row in conn.execute(
                select(messages.c.category, messages.c.status, func.count())
                .group_by(messages.c.category, messages.c.status)
            ):
                by_status.add_metric([row[0], row[1]], row[2])
            for row in conn.execute(
                select(suppressions.c.reason, func.count()).group_by(suppressions.c.reason)
            ):
                by_reason.add_metric([row[0]], row[1])
        yield by_status
        yield by_reason


@router.get("/metrics")
def metrics(rt: Annotated[Runtime, Depends(runtime)]) -> Response:
    """Prometheus text format."""
    registry = CollectorRegistry()
    registry.register(OutboxCollector(rt))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _day(value: str | None, default: datetime) -> datetime:
    if not value:
        return default
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationFailed("since/until are ISO 8601 dates, e.g. 2026-11-01") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get("/v1/stats")
def stats(
    key: Annotated[ApiKey, Depends(scoped("admin"))],
    rt: Annotated[Runtime, Depends(runtime)],
    since: Annotated[str | None, Query()] = None,
    until: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """Counts per day, category and status between ``since`` and ``until``."""
    now = rt.clock()
    start = _day(since, now - timedelta(days=30))
    end = _day(until, now)
    day = func.date(messages.c.created_at)
    with rt.engine.connect() as conn:
        rows = conn.execute(
            select(day, messages.c.category, messages.c.status, func.count())
            .where(messages.c.created_at >= start, messages.c.created_at < end)
            .group_by(day, messages.c.category, messages.c.status)
            .order_by(day)
        )
        out = [{"day": str(r[0]), "category": r[1], "status": r[2], "count": r[3]} for r in rows]
    return {"since": start.isoformat(), "until": end.isoformat(), "counts": out}
