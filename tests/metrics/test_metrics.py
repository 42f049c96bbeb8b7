"""``/metrics`` (SPEC 7): every metric after real work, the workers' SMTP histogram seen
from the API process, queue age, and the bearer token."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import ROOT, auth, unique_email, wait_for
from tests.services import free_port

#: SPEC 7's list: (family as the parser names it, its type).
REQUIRED = {
    "mailer_messages": "counter",  # mailer_messages_total{category,status}
    "mailer_suppressed": "counter",
    "mailer_bounce_reports": "counter",
    "mailer_relay_errors": "counter",
    "mailer_webhook_deliveries": "counter",
    "mailer_smtp_seconds": "histogram",
    "mailer_queue_oldest_age_seconds": "gauge",
}


def scrape(client: Any, headers: dict[str, str] | None = None) -> list[Sample]:
    """Every sample of /metrics, parsed as Prometheus would."""
    r = client.get("/metrics", headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(r.text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample ``name`` with exactly ``labels``' values among its labels (0 if none)."""
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def families(client: Any) -> dict[str, str]:
    """Metric family name -> type, as /metrics declares them."""
    return {f.name: f.type for f in text_string_to_metric_families(client.get("/metrics").text)}


@pytest.mark.usefixtures("worker")
def test_every_metric_is_there_after_real_work(client: Any, keys: dict[str, str]) -> None:
    from tests.scenarios.test_send_path import wait_final

    before = scrape(client)
    # Given two confirmations the worker sends over real SMTP, and a service alert the
    # policy refuses (nobody has an account at that address)
    r = client.post("/v1/messages/batch", headers=auth(keys["transactional"]), json={
        "messages": [{"template": "registration_confirmation", "to": unique_email("metrics"),
                      "data": {"name": "M", "confirm_url": "https://example.test/c"}}
                     for _ in range(2)]})
    ids = [result["id"] for result in r.json()["results"]]
    refused = client.post("/v1/messages", headers=auth(keys["transactional"]), json={
        "template": "service_alert", "to": unique_email("noaccount"),
        "data": {"name": "A", "title": "T", "body": "B"}})
    assert refused.json()["reason"] == "no_account"
    for message_id in ids:
        assert wait_final(client, keys["transactional"], message_id)["status"] == "sent"
    # Then every metric SPEC 7 lists is declared, with its type
    declared = families(client)
    assert {name: declared.get(name) for name in REQUIRED} == REQUIRED
    # And the counters moved by what happened
    after = wait_for(lambda: (
        (s := scrape(client)) and value(s, "mailer_smtp_seconds_count")
        >= value(before, "mailer_smtp_seconds_count") + 2 and s), timeout=30)
    category = "registration_confirmation"
    for status in ("queued", "sent"):
        grown = (value(after, "mailer_messages_total", category=category, status=status)
                 - value(before, "mailer_messages_total", category=category, status=status))
        assert grown >= 2, status
    assert (value(after, "mailer_suppressed_total", reason="no_account")
            == value(before, "mailer_suppressed_total", reason="no_account") + 1)
    # And the SMTP time the worker process observed is visible from this (API) process:
    # cumulative buckets ending in +Inf == count, and a positive sum
    buckets = sorted((float(s.labels["le"]), s.value) for s in after
                     if s.name == "mailer_smtp_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1] == (float("inf"), value(after, "mailer_smtp_seconds_count"))
    assert value(after, "mailer_smtp_seconds_sum") > 0
    # And the bounce reports expose every source and result, zero included
    results = {(s.labels["source"], s.labels["result"]) for s in after
               if s.name == "mailer_bounce_reports_total"}
    assert {("dsn", "applied"), ("dsn", "unmatched"), ("ses", "unrecognised")} <= results
    # And the outbox gauges tests and dashboards already use are still there
    assert value(after, "mailer_messages", category=category, status="sent") >= 2


def insert_queued(runtime: Any, created_at: datetime, send_at: datetime | None = None) -> str:
    """A queued outbox row nobody enqueued (no worker will take it); its id."""
    from mailer.store.outbox import insert_messages

    message_id = uuid.uuid4().hex
    with runtime.engine.begin() as conn:
        insert_messages(conn, [{
            "id": message_id, "category": "service_alert", "template": "service_alert",
            "status": "queued", "attempts": 0, "send_at": send_at,
            "message_id_header": f"<{message_id}@example.test>",
            "created_at": created_at, "updated_at": created_at}], created_at)
    return message_id


def test_queue_oldest_age_is_the_age_of_the_oldest_queued_message(
    client: Any, runtime: Any
) -> None:
    from mailer.metrics.outbox import MessageFlowCollector
    from mailer.store.outbox import transition
    from mailer.store.status import MessageStatus

    # Given the oldest queued message of all, accepted at a known time long ago, and one
    # scheduled even earlier whose send_at came later (its wait starts at send_at)
    accepted = datetime(2000, 1, 1, tzinfo=UTC)
    oldest = insert_queued(runtime, accepted)
    scheduled = insert_queued(runtime, accepted - timedelta(days=1),
                              send_at=accepted + timedelta(seconds=30))

    def age(now: datetime) -> float:
        collector = MessageFlowCollector(runtime.engine, lambda: now)
        [gauge] = [m for m in collector.collect() if m.name == "mailer_queue_oldest_age_seconds"]
        return float(gauge.samples[0].value)

    try:
        # Then the gauge is its age, measured from acceptance (or send_at)
        assert age(accepted + timedelta(seconds=100)) == 100.0
        # And /metrics carries it
        assert value(scrape(client), "mailer_queue_oldest_age_seconds") > 86400
        # And once it left the queue, the next oldest counts
        with runtime.engine.begin() as conn:
            transition(conn, oldest, [MessageStatus.QUEUED], MessageStatus.CANCELLED,
                       accepted, reason="test")
        assert age(accepted + timedelta(seconds=100)) == 70.0
    finally:
        with runtime.engine.begin() as conn:
            for message_id in (oldest, scheduled):
                transition(conn, message_id, [MessageStatus.QUEUED], MessageStatus.CANCELLED,
                           accepted, reason="test")


def test_the_metrics_token_is_required_when_set(runtime: Any) -> None:
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.runtime import Runtime

    # Given an API whose settings name a metrics token
    token = "metrics-" + uuid.uuid4().hex
    guarded = Runtime(settings=dataclasses.replace(runtime.settings, metrics_token=token),
                      engine=runtime.engine, catalogue=runtime.catalogue,
                      enqueuer=runtime.enqueuer)
    with TestClient(create_app(guarded)) as client:
        # When /metrics is asked without it, with another, or with another scheme
        for headers in ({}, auth("metrics-wrong"), auth(token[:-1]),
                        {"Authorization": f"Basic {token}"}):
            r = client.get("/metrics", headers=headers)
            # Then 401 with the error body and a challenge, and no metric
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            assert "mailer_" not in r.text
        # And with it (the scheme in any case), the metrics
        assert value(scrape(client, auth(token)), "mailer_relay_errors_total") >= 0
        assert client.get("/metrics", headers={"Authorization": f"bearer {token}"}).is_success
        # And the other operations endpoints stay open
        assert client.get("/healthz").status_code == 200


def test_shared_histogram_survives_a_redis_outage(redis_server: Any) -> None:
    from redis import Redis

    from mailer.metrics.shared import Publisher, SharedCollector, SharedHistogram

    # Given a histogram of its own name and a Redis that is not there
    histogram = SharedHistogram(f"mailer_test_{uuid.uuid4().hex[:8]}_seconds", "test",
                                (0.1, 1.0))
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    up = Redis.from_url(redis_server.url)
    for seconds in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(seconds)
    # When publishing fails, nothing is lost; when Redis is back, it all arrives
    assert not Publisher(down, [histogram]).publish()
    histogram.observe(0.2)
    assert Publisher(up, [histogram]).publish()
    assert Publisher(up, [histogram]).publish()  # nothing new: nothing added twice
    [family] = SharedCollector(up, [histogram]).collect()
    got = {(s.name.rsplit("_", 1)[-1], s.labels.get("le")): s.value for s in family.samples}
    # Then the buckets are cumulative ("less than or equal"), with the count and the sum
    assert got[("bucket", "0.1")] == 2
    assert got[("bucket", "1.0")] == 4
    assert got[("bucket", "+Inf")] == got[("count", None)] == 5
    assert got[("sum", None)] == pytest.approx(3.85)
    # And a collector that cannot reach Redis shows nothing rather than zeros
    assert list(SharedCollector(down, [histogram]).collect()) == []
    up.delete(histogram.key)


def test_the_dashboard_queries_only_metrics_we_export(client: Any) -> None:
    # Given the Grafana dashboard shipped in docs/
    dashboard = json.loads((ROOT / "docs/grafana/mailer.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # Then each of SPEC 7's metrics has a panel, and every series a panel reads exists
    named = {n for q in queries for n in re.findall(r"\bmailer_[a-z_]+", q)}
    exported = {s.name for s in scrape(client)}
    assert named <= exported, named - exported
    for family in REQUIRED:
        assert any(n.startswith(family) for n in named), family
    assert any("histogram_quantile(0.5," in q for q in queries)
    assert any("histogram_quantile(0.99," in q for q in queries)
