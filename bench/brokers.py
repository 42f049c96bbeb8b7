"""The queue's cost per message on each broker: Redis and RabbitMQ, private and on-box.

Enqueue: ``mailer.sending.queue.BrokerEnqueuer`` hands ``--chunks`` queue messages of 100
ids each (``CHUNK``) to the broker from one thread, as the API and the fan-out do; RabbitMQ
with publisher confirms and persistent messages, Redis with its AOF (everysec). Consume:
dramatiq's own consumer for that broker takes and acknowledges them (no actor runs), as a
worker's consumer thread does. Printed per broker: queue messages per second each way,
and CPU per *sent message* (a queue message carries 100) of the producer, the consumer
and the broker server.

Usage: ``.venv/bin/python bench/brokers.py --chunks 2000``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Group, cpu_delta


def run(url: str, server_pid: int, chunks: int) -> dict[str, Any]:
    """Enqueue and consume ``chunks`` queue messages on the broker at ``url``."""
    from mailer.sending.queue import CHUNK, SEND_QUEUE, BrokerEnqueuer

    enqueuer = BrokerEnqueuer(url)
    enqueuer.broker.flush(SEND_QUEUE)
    server = Group("broker", [server_pid])
    ids = [uuid.uuid4().hex for _ in range(CHUNK)]

    before, cpu, started = server.cpu(), time.process_time(), time.perf_counter()
    for _ in range(chunks):
        if not enqueuer.enqueue(ids):
            raise RuntimeError("enqueue failed")
    enqueue_s = time.perf_counter() - started
    enqueue_cpu = time.process_time() - cpu
    enqueue_server = cpu_delta(before, server.cpu())

    consumer = enqueuer.broker.consume(SEND_QUEUE, prefetch=32, timeout=1000)
    before, cpu, started = server.cpu(), time.process_time(), time.perf_counter()
    taken, deadline = 0, time.monotonic() + 300
    while taken < chunks and time.monotonic() < deadline:
        message = next(consumer)
        if message is None:
            continue
        consumer.ack(message)
        taken += 1
    consume_s = time.perf_counter() - started
    consume_cpu = time.process_time() - cpu
    consume_server = cpu_delta(before, server.cpu())
    consumer.close()
    enqueuer.close()
    per_message = 1e6 / (chunks * CHUNK)
    return {
        "queue_messages": chunks, "consumed": taken,
        "enqueue_per_s": round(chunks / enqueue_s),
        "consume_per_s": round(taken / consume_s),
        "enqueue_client_us_per_sent_msg": round(enqueue_cpu * per_message, 2),
        "enqueue_server_us_per_sent_msg": round(enqueue_server * per_message, 2),
        "consume_client_us_per_sent_msg": round(consume_cpu * per_message, 2),
        "consume_server_us_per_sent_msg": round(consume_server * per_message, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Start private brokers, measure each, print one JSON line per broker."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--brokers", default="redis,rabbitmq")
    args = parser.parse_args(argv)

    from tests.services import RabbitMQServer, RedisServer

    for name in args.brokers.split(","):
        if name == "redis":
            with RedisServer() as redis:
                result = run(redis.url, redis.pid, args.chunks)
        else:
            with RabbitMQServer() as rabbit:
                result = run(rabbit.url, rabbit.pid, args.chunks)
        print(json.dumps({"broker": name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
