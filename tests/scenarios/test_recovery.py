"""Accepted work survives a SIGKILLed worker: the outbox sweeper and leases recover it.

Run over both brokers (SPEC 10): Redis, and RabbitMQ through ``MAILER_BROKER_URL``.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest

from tests.conftest import ROOT, WorkerProcess, auth, base_env, unique_email, wait_for
from tests.services import RedisServer, redis_server_available, require

N_BATCHES = 3
BATCH = 100


@pytest.fixture(params=["redis", "rabbitmq"])
def isolated(request: pytest.FixtureRequest, db_url: str) -> Any:
    """Its own Redis and SMTP server, so only this test's workers see its queue; with
    RabbitMQ as the broker, the session's server with its send queue emptied first."""
    from tests.smtp_servers import running_smtp_server

    require("redis-server", redis_server_available(), "redis-server is not installed")
    with RedisServer() as redis, running_smtp_server() as (_, port, recorder):
        env = base_env(db_url, redis.url, port, MAILER_SEND_LEASE="3s")
        if request.param == "rabbitmq":
            from mailer.sending.queue import SEND_QUEUE, BrokerEnqueuer

            rabbitmq = request.getfixturevalue("rabbitmq_server")
            env["MAILER_BROKER_URL"] = rabbitmq.url
            enqueuer = BrokerEnqueuer(rabbitmq.url)
            enqueuer.broker.flush(SEND_QUEUE)
            enqueuer.close()
        yield env, recorder


def test_sigkilled_worker_loses_nothing(isolated: Any) -> None:
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.keys import create_key
    from mailer.runtime import Runtime
    from mailer.store.schema import messages

    env, recorder = isolated
    rt = Runtime.from_settings(Settings.from_environ(env))
    with rt.engine.begin() as conn:
        key = create_key(conn, "recovery", ["messages:transactional"])

    # Given 300 accepted registration confirmations
    ids: list[str] = []
    with TestClient(create_app(rt)) as client:
        for _ in range(N_BATCHES):
            batch = [{"template": "registration_confirmation", "to": unique_email("kill"),
                      "data": {"name": "K", "confirm_url": "https://example.test/c"}}
                     for _ in range(BATCH)]
            r = client.post("/v1/messages/batch", json={"messages": batch}, headers=auth(key))
            assert r.status_code == 202
            ids += [res["id"] for res in r.json()["results"]]
    assert len(ids) == N_BATCHES * BATCH
    with rt.engine.connect() as conn:
        expected = {row.message_id_header for row in conn.execute(
            select(messages.c.message_id_header).where(messages.c.id.in_(ids)))}

    # When a worker starts sending and is SIGKILLed mid-way
    first = WorkerProcess(env, threads=4)
    try:
        wait_for(lambda: len(recorder.messages) >= 40, timeout=60, interval=0.01)
    finally:
        first.kill()
    at_kill = len(recorder.messages)

    # And a new worker and the scheduler (outbox sweeper) take over
    second = WorkerProcess(env, threads=4)
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "workers.scheduler"], cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def all_sent() -> bool:
            with rt.engine.connect() as conn:
                states = Counter(r.status for r in conn.execute(
                    select(messages.c.status).where(messages.c.id.in_(ids))))
            return states == Counter({"sent": len(ids)})

        wait_for(all_sent, timeout=90, interval=0.2)
    finally:
        second.stop()
        scheduler.terminate()
        scheduler.wait(timeout=10)

    # Then every accepted message reached the SMTP server
    received = Counter(
        email.message_from_bytes(m.data)["Message-ID"] for m in recorder.messages
    )
    mine = {mid: n for mid, n in received.items() if mid in expected}
    lost = expected - set(mine)
    duplicates = sum(n - 1 for n in mine.values())
    print(f"\nrecovery: accepted={len(expected)} delivered_before_kill={at_kill} lost={len(lost)} "
          f"duplicates={duplicates}")
    assert not lost
    # And duplicates stay within what was in flight: 4 threads x one 16-message slice
    assert duplicates <= 4 * 16
