"""Campaign fan-out at scale: rate, and peak memory that must not grow with the audience.

    python bench/campaign_fanout.py [--recipients 100000,1000000] [--database postgresql]
                                    [--redis redis://127.0.0.1:6379/0] [--quick]

For each size N: generates N recipients in a fresh database (a SQLite file, or a new
database on a private PostgreSQL cluster with its default durability, bench/postgres.py;
a third opted in to the newsletter, 1 % of those hard-bounced), then fans a campaign out
to all of them in a *separate process* that runs the scheduler's campaign job
(``mailer.campaigns.tick.tick``) until the fan-out is done, enqueuing into a counting
enqueuer (or a real Redis with ``--redis``). That process's peak RSS
(``resource.getrusage``) is the figure that matters: it holds one batch at a time. On
PostgreSQL the server's CPU during the fan-out is reported too (the postmaster and every
process it forked). Seeding is not measured: SQLite gets multi-row inserts, PostgreSQL
``COPY`` and then ``VACUUM ANALYZE`` (what autovacuum would have done on a table that grew
to this size over time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 20_000
#: The sizes measured by default (the README quotes 100k and 1M) and with ``--quick``.
DEFAULT_SIZES = "100000,1000000"
QUICK_SIZES = "100000"
#: Every how-many-th recipient opted in to the newsletter (a third, as in earlier runs).
OPTED_IN_EVERY = 3
#: Longest the whole benchmark may run, seeding included (seconds).
DEFAULT_TIMEOUT = 3600.0
#: Upper bound on scheduler ticks in one fan-out (each writes a batch or finishes).
MAX_TICKS = 1_000_000


def _rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class CountingEnqueuer:
    """Counts ids as the Redis enqueuer would receive them; keeps none."""

    def __init__(self) -> None:
        self.ids = 0
        self.calls = 0

    def enqueue(self, ids: Sequence[str], delay_ms: int | None = None) -> bool:
        """Count."""
        self.ids += len(ids)
        self.calls += 1
        return True


def _env(url: str) -> dict[str, str]:
    return {"MAILER_ENV": "test", "MAILER_DATABASE_URL": url,
            "MAILER_SECRET_KEY": "bench-secret-key-0123456789abcdef",
            "MAILER_POSTAL_ADDRESS": "Example Ltd, 1 Example Street, Example City"}


def _is_postgresql(url: str) -> bool:
    from sqlalchemy.engine import make_url

    return make_url(url).get_backend_name() == "postgresql"


def generate(url: str, count: int, opted_every: int = OPTED_IN_EVERY) -> float:
    """Fill a migrated database with ``count`` recipients; return the seconds it took."""
    from mailer.config import Settings
    from mailer.runtime import utcnow
    from mailer.store.db import upgrade

    upgrade(url)
    key = Settings.from_environ(_env(url)).secret_key.encode()
    started = time.perf_counter()
    if _is_postgresql(url):
        _copy_rows(url, count, opted_every, key, utcnow())
    else:
        _insert_rows(url, count, opted_every, key, utcnow())
    return time.perf_counter() - started


def _person(n: int, key: bytes) -> dict[str, Any]:
    from suppression.addresses import address_hash

    address = f"person{n}@example.org"
    return {"id": n, "external_id": f"p{n}", "email": address,
            "email_hash": address_hash(address, key), "name": f"Person {n}",
            "attributes": {"plan": "pro" if n % 2 else "free", "n": n}}


def _insert_rows(url: str, count: int, opted_every: int, key: bytes, now: datetime) -> None:
    """Seed with multi-row inserts in chunks (SQLite)."""
    from sqlalchemy import insert

    from mailer.store.db import make_engine
    from mailer.store.schema import consent_events, recipients, suppressions

    engine = make_engine(url)
    for start in range(1, count + 1, CHUNK):
        people = [{**_person(n, key), "account_active": True, "created_at": now,
                   "updated_at": now} for n in range(start, min(start + CHUNK, count + 1))]
        opted = [p for p in people if p["id"] % opted_every == 0]
        with engine.begin() as conn:
            conn.execute(insert(recipients), people)
            conn.execute(insert(consent_events), [
                {"recipient_id": p["id"], "email_hash": p["email_hash"], "topic": "newsletter",
                 "granted": True, "source": "import", "policy_version": "1",
                 "occurred_at": now - timedelta(days=30), "recorded_at": now}
                for p in opted])
            blocked = [
                {"email": p["email"], "email_hash": p["email_hash"], "scope": "all",
                 "reason": "hard_bounce", "source": "bench", "created_at": now}
                for p in opted if p["id"] % 100 == 0]
            if blocked:
                conn.execute(insert(suppressions), blocked)
    engine.dispose()


def _copy_rows(url: str, count: int, opted_every: int, key: bytes, now: datetime) -> None:
    """Seed with COPY, the same rows as :func:`_insert_rows` (PostgreSQL)."""
    import psycopg
    from sqlalchemy.engine import make_url

    # The schema stores naive UTC (mailer.store.schema.base.UtcDateTime).
    at = now.astimezone(UTC).replace(tzinfo=None)
    consented = at - timedelta(days=30)
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy("COPY recipients (id, external_id, email, email_hash, name, attributes,"
                      " account_active, created_at, updated_at) FROM STDIN") as copy:
            for n in range(1, count + 1):
                p = _person(n, key)
                copy.write_row((n, p["external_id"], p["email"], p["email_hash"], p["name"],
                                json.dumps(p["attributes"]), True, at, at))
        with cur.copy("COPY consent_events (recipient_id, email_hash, topic, granted, source,"
                      " policy_version, occurred_at, recorded_at) FROM STDIN") as copy:
            for n in range(opted_every, count + 1, opted_every):
                p = _person(n, key)
                copy.write_row((n, p["email_hash"], "newsletter", True, "import", "1",
                                consented, at))
        with cur.copy("COPY suppressions (email, email_hash, scope, reason, source, created_at)"
                      " FROM STDIN") as copy:
            for n in range(opted_every, count + 1, opted_every):
                if n % 100 == 0:
                    p = _person(n, key)
                    copy.write_row((p["email"], p["email_hash"], "all", "hard_bounce", "bench",
                                    at))
        # COPY with explicit ids leaves the serial sequences behind; the app inserts later.
        for table in ("recipients", "consent_events", "suppressions"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT coalesce(max(id), 1) FROM {table}))")
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def fan_out(url: str, redis_url: str | None, batch: int, preview: bool,
            server_pid: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Create a campaign to everyone and run the campaign job until it is fanned out."""
    from sqlalchemy import func, select

    from bench.procs import Group, cpu_delta
    from mailer.campaigns import lifecycle as campaigns
    from mailer.campaigns.audience import eligibility
    from mailer.campaigns.tick import tick
    from mailer.config import Settings
    from mailer.mail.templates import Catalogue
    from mailer.runtime import Runtime
    from mailer.sending.queue import RedisEnqueuer
    from mailer.store.db import make_engine
    from mailer.store.schema import messages

    settings = Settings.from_environ(_env(url))
    enqueuer: Any = RedisEnqueuer(redis_url) if redis_url else CountingEnqueuer()
    rt = Runtime(settings=settings, engine=make_engine(url),
                 catalogue=Catalogue(settings.templates_dir), enqueuer=enqueuer)
    with rt.engine.begin() as conn:
        campaign_id = campaigns.create(conn, campaigns.NewCampaign(
            name="bench", template="newsletter", topic="newsletter", send_at=rt.clock(),
            data={"headline": "Spring", "body": "News"}), None, rt.clock())
    # The server's processes (its backend for our connection included) are alive at both
    # snapshots, so the difference is the server's CPU for this fan-out.
    server = Group("postgresql", [server_pid]) if server_pid else None
    server_before = server.cpu() if server else {}
    baseline = _current_rss_mb()
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    ticks = 0
    while ticks < MAX_TICKS:
        ticks += 1
        tick(rt, budget=timedelta(seconds=30), batch=batch)
        with rt.engine.connect() as conn:
            row = campaigns.get(conn, campaign_id)
        if row.fanned_out_at is not None:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"fan-out not done within {timeout:.0f} s ({row.written} written)")
    seconds = time.perf_counter() - started
    server_cpu = cpu_delta(server_before, server.cpu()) if server else None
    with rt.engine.connect() as conn:
        by_status: dict[str, int] = {str(s): int(n) for s, n in conn.execute(
            select(messages.c.status, func.count())
            .where(messages.c.campaign_id == campaign_id).group_by(messages.c.status)).all()}
    result: dict[str, Any] = {
        "recipients": row.audience_count, "messages": sum(by_status.values()),
        "by_status": by_status, "seconds": round(seconds, 2),
        "recipients_per_s": round(row.written / seconds), "batch": batch, "ticks": ticks,
        "enqueued": getattr(enqueuer, "ids", None),
        "rss_before_mb": round(baseline, 1), "peak_rss_mb": round(_rss_mb(), 1),
    }
    if server is not None and server_cpu is not None:
        result["postgresql_cpu_s"] = round(server_cpu, 2)
        result["postgresql_peak_rss_mb"] = round(server.peak_rss(), 1)
    if preview:
        with rt.engine.connect() as conn:
            row = campaigns.get(conn, campaign_id)
        started = time.perf_counter()
        found = eligibility(rt, row, batch)
        result["preview_seconds"] = round(time.perf_counter() - started, 2)
        result["preview_eligible"] = found.eligible
        result["peak_rss_after_preview_mb"] = round(_rss_mb(), 1)
    return result


@contextlib.contextmanager
def _databases(kind: str) -> Iterator[tuple[Any, int | None, str]]:
    """A fresh-database factory for ``kind``, the server's PID, and a line describing it."""
    if kind == "postgresql":
        from bench.postgres import cluster

        with cluster() as pg:
            yield (lambda size: pg.fresh_database(f"fanout_{size}")), pg.pid, pg.describe()
        return
    with tempfile.TemporaryDirectory(prefix="mailer-fanout-") as tmp:
        yield ((lambda size: contextlib.nullcontext(f"sqlite:///{Path(tmp) / f'{size}.db'}")),
               None, "SQLite file (WAL, synchronous=NORMAL)")


def main() -> int:
    """Generate, then fan out in a child process and report, for every size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", default=DEFAULT_SIZES,
                        help=f"comma-separated sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--opted-in-every", type=int, default=OPTED_IN_EVERY,
                        help="every how-many-th recipient opted in (1: all of them)")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--redis", help="enqueue into this Redis instead of counting")
    parser.add_argument("--preview", action="store_true",
                        help="also time GET /v1/campaigns/{id}/audience over the audience")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds the whole run may take, seeding included")
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fanout-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.fanout_only:
        print(json.dumps(fan_out(args.database_url, args.redis, args.batch, args.preview,
                                 args.server_pid, args.timeout)))
        return 0

    sizes = [int(n) for n in (QUICK_SIZES if args.quick else args.recipients).split(",") if n]
    deadline = time.monotonic() + args.timeout
    lines: list[str] = []
    with _databases(args.database) as (fresh, server_pid, describe):
        print(f"campaign fan-out on {describe}", flush=True)
        for size in sizes:
            with fresh(size) as url:
                took = generate(url, size, args.opted_in_every)
                print(f"generated {size:,} recipients in {took:.1f} s", file=sys.stderr,
                      flush=True)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"out of time after seeding {size:,} recipients")
                command = [sys.executable, __file__, "--fanout-only", "--database-url", url,
                           "--batch", str(args.batch), "--timeout", str(left),
                           *(["--server-pid", str(server_pid)] if server_pid else []),
                           *(["--redis", args.redis] if args.redis else []),
                           *(["--preview"] if args.preview else [])]
                out = subprocess.run(command, check=True, capture_output=True, text=True,
                                     timeout=left + 30)
                result = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"database": args.database, "profiles": size, **result},
                             indent=2), flush=True)
            server = (f"; PostgreSQL CPU {result['postgresql_cpu_s']} s, backend peak RSS "
                      f"{result['postgresql_peak_rss_mb']} MB"
                      if "postgresql_cpu_s" in result else "")
            statuses = ", ".join(f"{n:,} {s}" for s, n in sorted(result["by_status"].items()))
            lines.append(
                f"fan-out [{args.database}] {result['recipients']:,} recipients ({statuses}) "
                f"in {result['seconds']} s = {result['recipients_per_s']:,} recipients/s; "
                f"peak RSS {result['peak_rss_mb']} MB (process at start "
                f"{result['rss_before_mb']} MB){server}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
