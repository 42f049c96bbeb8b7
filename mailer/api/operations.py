"""Operations endpoints: Prometheus ``/metrics`` and aggregate ``/v1/stats`` (no personal data)."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from mailer.api.deps import runtime, scoped
from mailer.errors import Unauthorized, ValidationFailed
from mailer.events.metrics import DeliveriesCollector
from mailer.keys import ApiKey
from mailer.metrics.outbox import MessageFlowCollector
from mailer.metrics.shared import SharedCollector
from mailer.reports.matching import Result
from mailer.runtime import Runtime
from mailer.store.schema import bounce_reports, message_events, messages, suppressions
from mailer.store.status import MessageStatus
from mailer.webhooks import PROVIDERS

router = APIRouter(tags=["operations"])


class OutboxCollector(Collector):
    """Counts read from the database at scrape time, so web and worker processes agree."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[Metric]:
        """Messages by category and status, suppressions by reason, bounce reports by result."""
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
            # Every source and result is exposed, zero included, so a rate() or an alert on
            # "unmatched" works before the first forged report arrives.
            reports = {(name, r.value): 0 for name in PROVIDERS for r in Result}
            for row in conn.execute(
                select(bounce_reports.c.source, bounce_reports.c.result,
                       func.sum(bounce_reports.c.count))
                .group_by(bounce_reports.c.source, bounce_reports.c.result)
            ):
                reports[(row[0], row[1])] = int(row[2] or 0)
            # SPEC 5: attempts a relay refused because of *our* settings (credentials,
            # EHLO name, TLS, relaying); each deferral records one event with this detail.
            relay_errors = conn.execute(
                select(func.count()).select_from(message_events).where(
                    message_events.c.type == MessageStatus.DEFERRED,
                    message_events.c.detail == "relay_error")
            ).scalar_one()
        by_result = CounterMetricFamily(
            "mailer_bounce_reports", "Bounce and complaint reports by source and result "
            "(applied, unmatched: not tied to mail we sent, unrecognised: no usable recipient)",
            labels=["source", "result"])
        for (name, result), count in sorted(reports.items()):
            by_result.add_metric([name, result], count)
        yield by_status
        yield by_reason
        yield by_result
        yield CounterMetricFamily(
            "mailer_relay_errors", "SMTP attempts deferred because the relay refused us "
            "(authentication, EHLO name, TLS or relaying), not the recipient",
            value=relay_errors)


def _require_metrics_token(request: Request, rt: Runtime) -> None:
    """SPEC 7: with ``MAILER_METRICS_TOKEN`` set, /metrics needs it as a bearer token."""
    expected = rt.settings.metrics_token
    if not expected:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    # Compared in constant time, as bytes, so the time taken says nothing of the token.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), expected.encode()):
        raise Unauthorized("/metrics needs Authorization: Bearer <MAILER_METRICS_TOKEN>")


@router.get("/metrics")
def metrics(request: Request, rt: Annotated[Runtime, Depends(runtime)]) -> Response:
    """Prometheus text format: database-derived counts, and what workers published."""
    _require_metrics_token(request, rt)
    registry = CollectorRegistry()
    registry.register(OutboxCollector(rt))
    registry.register(DeliveriesCollector(rt.engine))
    registry.register(MessageFlowCollector(rt.engine, rt.clock))
    registry.register(SharedCollector(rt.redis))
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
