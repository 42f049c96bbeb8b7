"""What the order of message ids costs the outbox, on a table that already holds rows.

``python bench/id_order.py [--existing N] [--messages M] [--database sqlite|postgresql]``
fills a fresh database with N sent messages, then times (process CPU per row) what the
send path writes for M more: the inserts of acceptance or fan-out (500 a transaction),
the claims (100 a transaction) and the outcomes (16 a transaction). It does this twice,
on separate databases: with ids and Message-IDs that are wholly random (uuid4, as before),
and with the shipped ones (:func:`mailer.runtime.new_message_ids`: led by the time, so
rows written together share index pages). PostgreSQL runs on a private cluster
(``bench.deployment.database``), and its server processes' CPU is printed as its own column.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import Engine

from bench import deployment
from bench.procs import Group, cpu_delta
from mailer.runtime import new_message_ids
from mailer.store.db import make_engine, upgrade
from mailer.store.outbox import Outcome, claim, finish, insert_messages
from mailer.store.status import MessageStatus

DOMAIN = "example.test"


def random_ids(domain: str) -> tuple[str, str]:
    """The scheme before: a uuid4 row id and an unrelated uuid4 Message-ID."""
    return uuid.uuid4().hex, f"<{uuid.uuid4().hex}@{domain}>"


def _row(ids: Callable[[str], tuple[str, str]], status: str, now: datetime) -> dict[str, Any]:
    row_id, header = ids(DOMAIN)
    return {
        "id": row_id, "api_key_id": 0, "category": "service_alert", "template": "bench",
        "topic": None, "recipient_id": None, "to_email": "reader@example.test",
        "to_name": None, "to_hash": uuid.uuid4().hex * 2, "data": {"name": "Ada"},
        "status": status, "reason": None, "attempts": 0, "message_id_header": header,
        "created_at": now, "updated_at": now, "send_at": None,
    }


def _cpu_per_row(rows: int, work: Callable[[], None], server: Group | None,
                 ) -> tuple[float, float]:
    """µs of this process's CPU per row, and of the database server's (0 for SQLite)."""
    before = server.cpu() if server else {}
    started = time.process_time()
    work()
    mine = (time.process_time() - started) / rows * 1e6
    theirs = cpu_delta(before, server.cpu()) / rows * 1e6 if server else 0.0
    return mine, theirs


def measure(engine: Engine, ids: Callable[[str], tuple[str, str]], existing: int,
            count: int, server: Group | None = None) -> dict[str, tuple[float, float]]:
    """Fill ``existing`` rows, then µs of CPU per row to insert, claim and record ``count``
    (this process's, and the database server's)."""
    now = datetime.now(UTC)
    for start in range(0, existing, 1000):
        batch = [_row(ids, MessageStatus.SENT, now) for _ in range(min(1000, existing - start))]
        with engine.begin() as conn:
            insert_messages(conn, batch, now)
    fresh = [_row(ids, MessageStatus.QUEUED, now) for _ in range(count)]
    keys = [r["id"] for r in fresh]

    def insert() -> None:
        for i in range(0, count, 500):
            with engine.begin() as conn:
                insert_messages(conn, fresh[i:i + 500], now)

    def claims() -> None:
        for i in range(0, count, 100):
            with engine.begin() as conn:
                claim(conn, keys[i:i + 100], now, timedelta(minutes=2))

    def outcomes() -> None:
        for i in range(0, count, 16):
            with engine.begin() as conn:
                finish(conn, [Outcome(k, MessageStatus.SENT, smtp_code=250,
                                      smtp_response="250 ok") for k in keys[i:i + 16]], now)

    return {"insert": _cpu_per_row(count, insert, server),
            "claim": _cpu_per_row(count, claims, server),
            "outcome": _cpu_per_row(count, outcomes, server)}


def main() -> None:
    """Run both id schemes and print µs per row."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--existing", type=int, default=100_000,
                        help="sent messages already in the table")
    parser.add_argument("--messages", type=int, default=10_000, help="messages measured")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    schemes = {"random (uuid4)": random_ids, "time-led (shipped)": new_message_ids}
    results = {}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="mailer-ids-") as tmp:
        database = deployment.database(args.database, stack)
        server = (Group(database.name, [database.server_pid])
                  if database.server_pid is not None else None)
        for number, (name, ids) in enumerate(schemes.items()):
            work = Path(tmp) / f"ids{number}"
            work.mkdir()
            with database.fresh(work, f"ids{number}") as url:
                upgrade(url)
                engine = make_engine(url)
                try:
                    results[name] = measure(engine, ids, args.existing, args.messages, server)
                finally:
                    engine.dispose()
    print(f"{args.database}: {args.existing:,} rows already stored, {args.messages:,} "
          "measured; µs of CPU per row, this process" +
          (" + the PostgreSQL server" if server else ""))
    print(f"  {'ids':<20} {'insert':>14} {'claim':>14} {'outcome':>14}")
    for name, figures in results.items():
        cells = [f"{mine:.0f} + {theirs:.0f}" if server else f"{mine:.0f}"
                 for mine, theirs in figures.values()]
        print(f"  {name:<20} " + " ".join(f"{cell:>14}" for cell in cells))


if __name__ == "__main__":
    main()
