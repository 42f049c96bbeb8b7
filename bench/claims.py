"""Claim scaling: the database side of sending, with 1, 2 and 4 worker processes.

Each worker process runs ``--threads`` threads; each thread takes a chunk of 100 ids (one
queue message), claims it (``mailer.store.outbox.claim``: one transaction) and records
every row as sent in slices of 16 (``finish``: one transaction per slice), exactly as the
dispatcher does, with no SMTP in between. So the figures are the database's ceiling for
the send path, and its cost per message.

Two ways the chunks reach the workers:

- ``disjoint`` (normal operation): each chunk goes to one worker, as the broker hands it.
- ``overlap`` (a redelivery storm: the sweeper re-enqueued a backlog that is also still
  in the queue): every process tries every chunk, starting at a different place.

``--claim plain`` runs the claim without ``FOR UPDATE SKIP LOCKED`` (the statement before
it was added), to show what the row locks cost.

Usage: ``.venv/bin/python bench/claims.py --db postgresql --processes 1,2,4``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Group, cpu_delta

CHUNK = 100
SLICE = 16
LEASE = timedelta(minutes=2)


def plain_claim(conn: Any, ids: Sequence[str], now: Any, lease: timedelta) -> list[Any]:
    """The claim without SKIP LOCKED: a compare-and-set UPDATE ... RETURNING."""
    from sqlalchemy import and_, or_, update

    from mailer.store.outbox import _CLAIM_COLUMNS
    from mailer.store.schema import messages
    from mailer.store.status import MessageStatus

    status = messages.c.status.concat("")
    claimable = or_(
        status == MessageStatus.QUEUED,
        and_(status == MessageStatus.DEFERRED, messages.c.next_attempt_at <= now),
        and_(status == MessageStatus.SENDING, messages.c.lease_until < now),
    )
    return list(conn.execute(
        update(messages).where(messages.c.id.in_(list(ids)), claimable)
        .values(status=MessageStatus.SENDING, attempts=messages.c.attempts + 1,
                lease_until=now + lease, updated_at=now)
        .returning(*_CLAIM_COLUMNS)))


def seed(engine: Any, count: int) -> list[str]:
    """Insert ``count`` queued messages; return their ids."""
    from mailer.store.outbox import insert_messages
    from mailer.times import utcnow

    now = utcnow()
    rows = []
    for _ in range(count):
        rows.append({
            "id": uuid.uuid4().hex, "api_key_id": 0, "category": "registration_confirmation",
            "template": "registration_confirmation", "topic": None, "recipient_id": None,
            "to_email": "bench@example.org", "to_name": None, "to_hash": uuid.uuid4().hex * 2,
            "data": {}, "status": "queued", "reason": None, "attempts": 0,
            "message_id_header": f"<{uuid.uuid4().hex}@example.org>", "created_at": now,
            "updated_at": now, "send_at": None,
        })
    for start in range(0, count, 1000):
        with engine.begin() as conn:
            insert_messages(conn, rows[start : start + 1000], now)
    return [r["id"] for r in rows]


def worker(url: str, chunks: list[list[str]], threads: int, plain: bool, hold: float,
           go: Any, release: Any, results: Any) -> None:
    """One worker process: ``threads`` threads claim and finish the given chunks."""
    from mailer.store.db import make_engine
    from mailer.store.outbox import Outcome, claim, finish
    from mailer.store.status import MessageStatus
    from mailer.times import utcnow

    engine = make_engine(url, pool_size=threads + 1)
    take = plain_claim if plain else claim
    lock = threading.Lock()
    todo = list(chunks)
    claim_ms: list[float] = []
    finish_ms: list[float] = []
    claimed = [0]

    def run() -> None:
        while True:
            with lock:
                if not todo:
                    return
                ids = todo.pop(0)
            t0 = time.perf_counter()
            with engine.begin() as conn:
                rows = take(conn, ids, utcnow(), LEASE)
                if rows and hold:
                    time.sleep(hold)  # the send-time decision, inside the claim's transaction
            t1 = time.perf_counter()
            for start in range(0, len(rows), SLICE):
                part = rows[start : start + SLICE]
                s0 = time.perf_counter()
                with engine.begin() as conn:
                    finish(conn, [Outcome(r.id, MessageStatus.SENT, smtp_code=250)
                                  for r in part], utcnow())
                with lock:
                    finish_ms.append((time.perf_counter() - s0) * 1000)
            with lock:
                claim_ms.append((t1 - t0) * 1000)
                claimed[0] += len(rows)

    go.wait()
    started, cpu = time.perf_counter(), time.process_time()
    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    results.put({"claimed": claimed[0], "seconds": time.perf_counter() - started,
                 "cpu": time.process_time() - cpu, "claim_ms": claim_ms,
                 "finish_ms": finish_ms})
    # Connections stay open until the database server's CPU has been read.
    release.wait(60)
    engine.dispose()


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(url: str, processes: int, threads: int, messages: int, mode: str,
            plain: bool, hold: float = 0.0, db_pid: int | None = None) -> dict[str, Any]:
    """One run: seed, start the workers together, and summarise."""
    from mailer.store.db import make_engine

    database = Group("database", [db_pid] if db_pid else [])
    engine = make_engine(url, pool_size=1)
    with engine.connect():
        pass  # connected before the clock starts, like a running API process
    db_before, cpu = database.cpu(), time.process_time()
    ids = seed(engine, messages)
    # Read while the connection's server process still lives.
    seed_cpu, seed_db = time.process_time() - cpu, cpu_delta(db_before, database.cpu())
    engine.dispose()
    chunks = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)]
    if mode == "disjoint":
        shares = [chunks[p::processes] for p in range(processes)]
    else:  # every process tries every chunk, each starting elsewhere
        shares = [chunks[p * len(chunks) // processes:] + chunks[: p * len(chunks) // processes]
                  for p in range(processes)]
    ctx = mp.get_context("spawn")
    go, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker,
                         args=(url, share, threads, plain, hold, go, release, results))
             for share in shares]
    for p in procs:
        p.start()
    time.sleep(2.0)  # let every process import and connect before the clock starts
    waits: list[int] = []
    done = threading.Event()
    sampler = threading.Thread(target=sample_lock_waits, args=(url, done, waits))
    sampler.start()
    db_before = database.cpu()
    started = time.perf_counter()
    go.set()
    out = [results.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - started
    db_cpu = cpu_delta(db_before, database.cpu())
    release.set()
    done.set()
    sampler.join()
    for p in procs:
        p.join(timeout=30)
    claims = [v for o in out for v in o["claim_ms"]]
    finishes = [v for o in out for v in o["finish_ms"]]
    claimed = sum(o["claimed"] for o in out)
    return {
        "processes": processes, "threads": threads, "mode": mode,
        "claim": "plain" if plain else "skip_locked", "hold_ms": hold * 1000,
        "messages": messages,
        "claimed": claimed, "seconds": round(wall, 2),
        "messages_per_s": round(claimed / wall),
        "claims": len(claims), "claim_p50_ms": round(statistics.median(claims), 2),
        "claim_p99_ms": round(pct(claims, 0.99), 2),
        "finish_p50_ms": round(statistics.median(finishes), 2) if finishes else 0,
        "finish_p99_ms": round(pct(finishes, 0.99), 2),
        # Sessions found waiting for a row lock, sampled every 10 ms (PostgreSQL only).
        "lock_wait_samples": sum(waits), "lock_wait_max": max(waits, default=0),
        # CPU per message: the worker processes (Python, SQLAlchemy, the driver) and the
        # PostgreSQL server (every backend); SQLite's work is inside the workers' figure.
        "worker_cpu_us_per_msg": round(sum(o["cpu"] for o in out) / max(claimed, 1) * 1e6),
        "db_cpu_us_per_msg": round(db_cpu / max(claimed, 1) * 1e6),
        # Writing the rows as acceptance does (insert_messages, 1,000 a transaction).
        "insert_client_us_per_msg": round(seed_cpu / messages * 1e6),
        "insert_db_us_per_msg": round(seed_db / messages * 1e6),
    }


def sample_lock_waits(url: str, done: threading.Event, out: list[int]) -> None:
    """Every 10 ms until ``done``, count the sessions waiting on a lock."""
    if not url.startswith("postgresql"):
        return
    from sqlalchemy import text

    from mailer.store.db import make_engine

    engine = make_engine(url, pool_size=1)
    with engine.connect() as conn:
        while not done.is_set():
            out.append(int(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"))
                .scalar_one()))
            conn.rollback()
            done.wait(0.01)
    engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Start a private database, run the requested runs, print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="postgresql")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--mode", choices=("disjoint", "overlap"), default="disjoint")
    parser.add_argument("--claim", choices=("skip_locked", "plain"), default="skip_locked")
    parser.add_argument("--hold-ms", type=float, default=0.0,
                        help="time a claim transaction stays open after the claim "
                             "(the dispatcher decides in it)")
    args = parser.parse_args(argv)

    from mailer.store.db import upgrade
    from tests.services import PostgresServer

    server: PostgresServer | None = None
    workdir = Path(tempfile.mkdtemp(prefix="mailer-bench-claims-"))
    try:
        if args.db == "postgresql":
            server = PostgresServer().start()
            url = server.url
        else:
            url = f"sqlite:///{workdir / 'mailer.db'}"
        upgrade(url)
        for processes in (int(p) for p in args.processes.split(",")):
            result = measure(url, processes, args.threads, args.messages, args.mode,
                             args.claim == "plain", args.hold_ms / 1000,
                             server.pid if server is not None else None)
            print(json.dumps({"db": args.db, **result}), flush=True)
    finally:
        if server is not None:
            server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
