"""RabbitMQ as the broker (``MAILER_BROKER_URL=amqp://``, SPEC 10), end to end.

HTTP API -> database -> a real rabbitmq-server -> a real dramatiq worker -> a real SMTP
server (aiosmtpd). The database stays the source of truth (SPEC 5); these tests show that
RabbitMQ keeps its side of the bargain too: durable queues and persistent messages survive
a crash of the broker, and a restart mid-run loses nothing that was accepted.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import ROOT, WorkerProcess, auth, base_env, unique_email, wait_for
from tests.services import RabbitMQServer, RedisServer, redis_server_available, require

#: Worker threads per process, and the dispatcher's slice: a worker cut off between an
#: SMTP 250 and the commit of its slice resends at most THREADS x SLICE messages.
THREADS = 4
SLICE = 16


@dataclass
class Stack:
    """One test's API runtime, its environment and its SMTP recorder."""

    env: dict[str, str]
    rt: Any
    client: Any
    key: str
    recorder: Any


@pytest.fixture()
def stack(db_url: str, rabbitmq_server: RabbitMQServer) -> Iterator[Stack]:
    """The API on RabbitMQ, with its own Redis (pacing, metrics) and SMTP server."""
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.keys import create_key
    from mailer.runtime import Runtime
    from mailer.sending.queue import SEND_QUEUE
    from tests.smtp_servers import running_smtp_server

    require("redis-server", redis_server_available(), "redis-server is not installed")
    with RedisServer() as redis, running_smtp_server() as (_, port, recorder):
        env = base_env(db_url, redis.url, port, MAILER_BROKER_URL=rabbitmq_server.url,
                       MAILER_SEND_LEASE="5s")
        rt = Runtime.from_settings(Settings.from_environ(env))
        # The server is shared by the session: start from an empty send queue.
        rt.enqueuer.broker.flush(SEND_QUEUE)
        with rt.engine.begin() as conn:
            key = create_key(conn, "rabbitmq", ["messages:transactional"])
        with TestClient(create_app(rt)) as client:
            yield Stack(env, rt, client, key, recorder)
        rt.enqueuer.close()


def accept(stack: Stack, count: int) -> list[str]:
    """Accept ``count`` registration confirmations in batches of 100; return their ids."""
    ids: list[str] = []
    for start in range(0, count, 100):
        batch = [{"template": "registration_confirmation", "to": unique_email("amqp"),
                  "data": {"name": "R", "confirm_url": "https://example.test/c"}}
                 for _ in range(min(100, count - start))]
        r = stack.client.post("/v1/messages/batch", json={"messages": batch},
                              headers=auth(stack.key))
        assert r.status_code == 202, r.text
        ids += [res["id"] for res in r.json()["results"]]
    return ids


def message_ids(stack: Stack, ids: list[str]) -> set[str]:
    """The Message-ID headers of the given rows."""
    from sqlalchemy import select

    from mailer.store.schema import messages

    with stack.rt.engine.connect() as conn:
        return {r.message_id_header for r in conn.execute(
            select(messages.c.message_id_header).where(messages.c.id.in_(ids)))}


def all_sent(stack: Stack, ids: list[str]) -> bool:
    """True when every one of ``ids`` is ``sent``."""
    from sqlalchemy import select

    from mailer.store.schema import messages

    with stack.rt.engine.connect() as conn:
        states = Counter(r.status for r in conn.execute(
            select(messages.c.status).where(messages.c.id.in_(ids))))
    return states == Counter({"sent": len(ids)})


def deliveries(stack: Stack, expected: set[str]) -> tuple[set[str], int]:
    """Of ``expected`` Message-IDs: those never delivered, and the duplicate count."""
    received = Counter(email.message_from_bytes(m.data)["Message-ID"]
                       for m in list(stack.recorder.messages))
    mine = {mid: n for mid, n in received.items() if mid in expected}
    return expected - set(mine), sum(n - 1 for n in mine.values())


def scheduler(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The scheduler process (its outbox sweeper re-enqueues what a queue lost)."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.scheduler"], cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_broker_url_defaults_to_redis_and_takes_amqp() -> None:
    from mailer.config import Settings, check
    from mailer.errors import ConfigError
    from mailer.sending.queue import amqp_url, is_amqp

    # Given no MAILER_BROKER_URL, Then the broker is MAILER_REDIS_URL's Redis (SPEC 10)
    plain = Settings.from_environ({"MAILER_ENV": "test",
                                   "MAILER_REDIS_URL": "redis://127.0.0.1:6390/2"})
    assert plain.broker_url == "redis://127.0.0.1:6390/2"
    assert not is_amqp(plain.broker_url)
    # Given an amqp:// URL, Then it is used, with bounded timeouts added to what it leaves out
    rabbit = Settings.from_environ({"MAILER_ENV": "test",
                                    "MAILER_BROKER_URL": "amqp://u:p@127.0.0.1:5673/v?heartbeat=30"})
    check(rabbit)
    assert is_amqp(rabbit.broker_url)
    url = amqp_url(rabbit.broker_url)
    assert url.startswith("amqp://u:p@127.0.0.1:5673/v?")
    assert "heartbeat=30" in url and "blocked_connection_timeout=10" in url
    # Given any other scheme, Then the configuration check refuses it at start-up
    with pytest.raises(ConfigError, match="MAILER_BROKER_URL"):
        check(Settings.from_environ({"MAILER_ENV": "test",
                                     "MAILER_BROKER_URL": "kafka://127.0.0.1:9092"}))


def test_send_path_through_rabbitmq(stack: Stack) -> None:
    # Given a worker consuming from RabbitMQ
    worker = WorkerProcess(stack.env, threads=THREADS)
    try:
        # When one message and a batch of 150 are accepted over HTTP
        r = stack.client.post(
            "/v1/messages", headers=auth(stack.key),
            json={"template": "registration_confirmation", "to": unique_email("amqp1"),
                  "data": {"name": "Ada", "confirm_url": "https://example.test/confirm/1"}})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
        ids = [r.json()["id"], *accept(stack, 150)]
        # Then every one is sent, and the SMTP server has each exactly once
        wait_for(lambda: all_sent(stack, ids), timeout=90, interval=0.2)
        lost, duplicates = deliveries(stack, message_ids(stack, ids))
        assert not lost
        assert duplicates == 0
        # And the message reads as sent over the API, with the SMTP reply recorded
        status = stack.client.get(f"/v1/messages/{ids[0]}", headers=auth(stack.key)).json()
        assert status["status"] == "sent"
        # And readiness checks the broker actually in use
        ready = stack.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "redis": "ok"}
    finally:
        worker.stop()
    assert "Consumer encountered" not in worker.log_text()


def test_queued_messages_survive_a_broker_crash_without_the_sweeper(
    stack: Stack, rabbitmq_server: RabbitMQServer
) -> None:
    from mailer.sending.queue import SEND_QUEUE

    # Given 300 accepted messages waiting in RabbitMQ, with no worker running
    ids = accept(stack, 300)
    counts = stack.rt.enqueuer.broker.get_queue_message_counts(SEND_QUEUE)
    assert counts[0] == 3  # three chunks of 100 ids
    # When the broker is SIGKILLed and started again
    rabbitmq_server.kill()
    rabbitmq_server.start()
    # And a worker starts, with no scheduler (so no sweeper re-enqueues anything)
    worker = WorkerProcess(stack.env, threads=THREADS)
    try:
        # Then every message is sent from what RabbitMQ kept on disk: the queue is
        # durable, the messages persistent, and each enqueue was confirmed
        wait_for(lambda: all_sent(stack, ids), timeout=90, interval=0.2)
    finally:
        worker.stop()
    lost, duplicates = deliveries(stack, message_ids(stack, ids))
    assert not lost
    assert duplicates == 0


def test_broker_restart_mid_run_loses_nothing(
    stack: Stack, rabbitmq_server: RabbitMQServer
) -> None:
    # Given a worker and the scheduler running, and 600 accepted messages
    worker = WorkerProcess(stack.env, threads=THREADS)
    sweeper = scheduler(stack.env)
    try:
        ids = accept(stack, 600)
        # When RabbitMQ is SIGKILLed once sending is under way, and comes back 1 s later
        wait_for(lambda: len(stack.recorder.messages) >= 100, timeout=60, interval=0.01)
        rabbitmq_server.kill()
        at_crash = len(stack.recorder.messages)
        # And 50 more are accepted while it is down (the enqueue fails; the rows stay)
        during = accept(stack, 50)
        rabbitmq_server.start()
        # Then everything accepted is sent, without restarting the worker or the API
        wait_for(lambda: all_sent(stack, ids + during), timeout=120, interval=0.2)
    finally:
        stop(sweeper)
        worker.stop()
    lost, duplicates = deliveries(stack, message_ids(stack, ids + during))
    print(f"\nrabbitmq restart: accepted={len(ids) + len(during)} "
          f"delivered_before_crash={at_crash} lost={len(lost)} duplicates={duplicates}")
    assert not lost
    # And duplicates stay within one slice per worker thread: the worker lost its
    # connection, not its database state
    assert duplicates <= THREADS * SLICE
