"""Campaign fan-out at scale: rate, and peak memory that must not grow with the audience.

    python bench/campaign_fanout.py --recipients 200000 [--redis redis://127.0.0.1:6379/0]

Generates N recipients in a fresh SQLite database (a third opted in to the newsletter, 1 %
of those hard-bounced), then fans a campaign out to all of them in a *separate process*
that runs the scheduler's campaign job (``mailer.campaigns.tick.tick``) until the fan-out is done,
enqueuing into a counting enqueuer (or a real Redis with ``--redis``). That process's
peak RSS (``resource.getrusage``) is the figure that matters: it holds one batch at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 20_000


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


def generate(url: str, count: int) -> float:
    """Fill a migrated database with ``count`` recipients; return the seconds it took."""
    from sqlalchemy import insert

    from mailer.config import Settings
    from mailer.store.db import make_engine, upgrade
    from mailer.store.schema import consent_events, recipients, suppressions
    from suppression.addresses import address_hash

    upgrade(url)
    settings = Settings.from_environ(_env(url))
    key = settings.secret_key.encode()
    engine = make_engine(url)
    started = time.perf_counter()
    from mailer.runtime import utcnow
    now = utcnow()
    for start in range(1, count + 1, CHUNK):
        numbers = range(start, min(start + CHUNK, count + 1))
        people = []
        for n in numbers:
            address = f"person{n}@example.org"
            people.append({"id": n, "external_id": f"p{n}", "email": address,
                           "email_hash": address_hash(address, key), "name": f"Person {n}",
                           "attributes": {"plan": "pro" if n % 2 else "free", "n": n},
                           "account_active": True, "created_at": now, "updated_at": now})
        opted = [p for p in people if p["id"] % 3 == 0]
        with engine.begin() as conn:
            conn.execute(insert(recipients), people)
            conn.execute(insert(consent_events), [
                {"recipient_id": p["id"], "email_hash": p["email_hash"], "topic": "newsletter",
                 "granted": True, "source": "import", "policy_version": "1",
                 "occurred_at": now - timedelta(days=30), "recorded_at": now}
                for p in opted])
            conn.execute(insert(suppressions), [
                {"email": p["email"], "email_hash": p["email_hash"], "scope": "all",
                 "reason": "hard_bounce", "source": "bench", "created_at": now}
                for p in opted if p["id"] % 100 == 0])
    engine.dispose()
    return time.perf_counter() - started


def fan_out(url: str, redis_url: str | None, batch: int, preview: bool) -> dict[str, Any]:
    """Create a campaign to everyone and run the campaign job until it is fanned out."""
    from sqlalchemy import func, select

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
    baseline = _current_rss_mb()
    started = time.perf_counter()
    ticks = 0
    while True:
        ticks += 1
        tick(rt, budget=timedelta(seconds=30), batch=batch)
        with rt.engine.connect() as conn:
            row = campaigns.get(conn, campaign_id)
        if row.fanned_out_at is not None:
            break
    seconds = time.perf_counter() - started
    with rt.engine.connect() as conn:
        by_status = dict(conn.execute(
            select(messages.c.status, func.count())
            .where(messages.c.campaign_id == campaign_id).group_by(messages.c.status)).all())
    result: dict[str, Any] = {
        "recipients": row.audience_count, "messages": sum(by_status.values()),
        "by_status": by_status, "seconds": round(seconds, 2),
        "recipients_per_s": round(row.written / seconds), "batch": batch, "ticks": ticks,
        "enqueued": getattr(enqueuer, "ids", None),
        "rss_before_mb": round(baseline, 1), "peak_rss_mb": round(_rss_mb(), 1),
    }
    if preview:
        with rt.engine.connect() as conn:
            row = campaigns.get(conn, campaign_id)
        started = time.perf_counter()
        found = eligibility(rt, row, batch)
        result["preview_seconds"] = round(time.perf_counter() - started, 2)
        result["preview_eligible"] = found.eligible
        result["peak_rss_after_preview_mb"] = round(_rss_mb(), 1)
    return result


def main() -> int:
    """Generate, then fan out in a child process and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--redis", help="enqueue into this Redis instead of counting")
    parser.add_argument("--preview", action="store_true",
                        help="also time GET /v1/campaigns/{id}/audience over the audience")
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--fanout-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.fanout_only:
        print(json.dumps(fan_out(args.database_url, args.redis, args.batch, args.preview)))
        return 0

    with tempfile.TemporaryDirectory(prefix="mailer-fanout-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        took = generate(url, args.recipients)
        print(f"generated {args.recipients:,} recipients in {took:.1f} s", file=sys.stderr)
        command = [sys.executable, __file__, "--fanout-only", "--database-url", url,
                   "--batch", str(args.batch), *(["--redis", args.redis] if args.redis else []),
                   *(["--preview"] if args.preview else [])]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    print(f"fan-out: {result['recipients']:,} recipients in {result['seconds']} s "
          f"= {result['recipients_per_s']:,}/s; peak RSS {result['peak_rss_mb']} MB "
          f"(process at start {result['rss_before_mb']} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
