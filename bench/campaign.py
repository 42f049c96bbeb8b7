"""Campaign fan-out end to end: campaign job -> outbox -> Redis -> dramatiq workers -> sink.

The message is the pipeline's (same HTML) as a newsletter promotion, so it also carries
the compliance footer and the List-Unsubscribe headers. The scenario seeds a fresh
database with recipients who all opted in to the newsletter (5 % of them hard-bounced),
starts the workers and a fan-out process that creates a campaign and runs the scheduler's
campaign job (``mailer.campaigns.tick.tick``) until it has fanned out. The clock runs from the go
signal to the sink's 250 for the last message.

The fan-out process: ``python -m bench.campaign --database-url U --redis R --ready F
--go G --result J`` (with the ``MAILER_*`` environment of the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select

from bench import content
from bench.pipeline import SUPPRESSED_EVERY, mailer_env
from bench.procs import ROOT, BenchError, Group, Proc, python, wait_until
from bench.stack import Config, Measurement, Sink, Window
from mailer.store.db import make_engine, upgrade
from mailer.store.schema import consent_events, messages, recipients, suppressions
from suppression.addresses import address_hash, normalise

#: How long the fan-out process lingers after it is done, waiting to be stopped (seconds).
LINGER = 300.0


def _seed(db_url: str, secret: str, count: int) -> int:
    """Opted-in recipients; return how many of them are suppressed."""
    key = secret.encode()
    now = datetime.now(UTC)
    engine = make_engine(db_url)
    suppressed = 0
    people, consents, blocked = [], [], []
    for n in range(1, count + 1):
        email = normalise(f"reader{n}@example.org")
        digest = address_hash(email, key)
        people.append({"id": n, "external_id": f"reader-{n}", "email": email,
                       "email_hash": digest, "name": f"Reader {n}", "attributes": {},
                       "account_active": True, "created_at": now, "updated_at": now})
        consents.append({"recipient_id": n, "email_hash": digest, "topic": "newsletter",
                         "granted": True, "source": "import", "policy_version": "1",
                         "occurred_at": now - timedelta(days=30), "recorded_at": now})
        if n % SUPPRESSED_EVERY == 7:
            suppressed += 1
            blocked.append({"email": None, "email_hash": digest, "scope": "all",
                            "reason": "hard_bounce", "source": "bench", "created_at": now})
    with engine.begin() as conn:
        conn.execute(insert(recipients), people)
        conn.execute(insert(consent_events), consents)
        conn.execute(insert(suppressions), blocked)
    engine.dispose()
    return suppressed


def run(cfg: Config, sink_kind: str, index: int) -> Measurement:
    """One measured campaign: fan-out and sending overlap, as they do in production."""
    work = cfg.work / f"campaign-{sink_kind}-{index}"
    work.mkdir(parents=True)
    db_url = f"sqlite:///{work / 'mailer.db'}"
    upgrade(db_url)
    sink = Sink(sink_kind, work)
    templates = content.lay_templates(ROOT / "templates", work / "templates")
    env = mailer_env(cfg, db_url, sink.port, templates)
    suppressed = _seed(db_url, env["MAILER_SECRET_KEY"], cfg.messages)
    expected = cfg.messages - suppressed
    procs: list[Proc] = []
    try:
        worker = Proc("worker", [python(), "-m", "dramatiq", "workers.actors", "--processes",
                                 str(cfg.processes), "--threads", str(cfg.threads)],
                      env, log=work / "worker.log")
        procs.append(worker)
        ready, go, result = work / "ready", work / "go", work / "result.json"
        fanout = Proc("fan-out", [python(), "-m", "bench.campaign", "--database-url", db_url,
                                  "--redis", cfg.redis_url, "--ready", str(ready),
                                  "--go", str(go), "--result", str(result)],
                      env, log=work / "fanout.log")
        procs.append(fanout)

        def check() -> None:
            worker.check()
            if fanout.popen.poll() not in (None, 0):
                fanout.check()

        def fanout_ready() -> bool:
            check()
            return ready.exists()

        wait_until("fan-out process ready", fanout_ready, cfg.timeout)
        # The workers need their imports and forks done before the clock starts.
        time.sleep(3.0)
        groups = {"worker": Group("worker", [worker.pid]), "api": Group("api", [fanout.pid]),
                  "redis": Group("redis", [cfg.redis_pid]),
                  "sink": Group("sink", [sink.proc.pid]),
                  "client": Group("client", [os.getpid()], tree=False)}
        window = Window(groups, sink, cfg.timeline)
        go.write_text("go\n")
        start = time.monotonic()
        last = sink.wait_for(expected, cfg.timeout, check)
        cpu, rss = window.close()
        if cfg.timeline:
            print(window.timeline(), flush=True)
        wait_until("fan-out result", lambda: result.exists(), cfg.timeout)
        fanned = json.loads(result.read_text())
        _verify(db_url, expected, suppressed, cfg.timeout)
        return Measurement("campaign", sink_kind, expected, last - start, cpu, rss,
                           note=f"fan-out wrote {fanned['written']} rows in "
                                f"{fanned['seconds']:.2f} s while the workers sent",
                           background=window.background)
    finally:
        for proc in reversed(procs):
            proc.stop()
        sink.stop()


def _verify(db_url: str, sent: int, suppressed: int, timeout: float) -> None:
    """Every campaign message ends sent or suppressed, as the sink saw it."""
    engine = make_engine(db_url)
    found: dict[str, int] = {}

    def settled() -> bool:
        nonlocal found
        with engine.connect() as conn:
            found = {row.status: int(row.n) for row in conn.execute(
                select(messages.c.status, func.count().label("n")).group_by(messages.c.status))}
        return found.get("sent", 0) >= sent

    try:
        wait_until("campaign messages recorded as sent", settled, timeout, interval=0.1)
    finally:
        engine.dispose()
    # Suppressed readers may get a "suppressed" row or none, depending on the fan-out.
    if found.get("sent") != sent or not set(found) <= {"sent", "suppressed"} or (
        found.get("suppressed", suppressed) != suppressed
    ):
        raise BenchError(f"database disagrees with the sink: {found}")


def fan_out(db_url: str, redis_url: str, ready: Path, go: Path, result: Path) -> None:
    """Create the campaign at the go signal and run the campaign job until it is done."""
    from mailer.campaigns import lifecycle as campaigns
    from mailer.campaigns.tick import tick
    from mailer.config import Settings
    from mailer.runtime import Runtime
    from mailer.sending.queue import RedisEnqueuer

    settings = Settings.from_environ()
    rt = Runtime.from_settings(settings, RedisEnqueuer(redis_url))
    ready.write_text("ready\n")
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.005)
    # The shared variables of the pipeline's message; "name" comes from each profile.
    shared = {k: v for k, v in content.data(0).items() if k != "name"}
    started = time.monotonic()
    with rt.engine.begin() as conn:
        campaign_id = campaigns.create(conn, campaigns.NewCampaign(
            name="bench", template=content.CAMPAIGN_TEMPLATE, topic="newsletter",
            send_at=rt.clock(), data=shared), None, rt.clock())
    written = 0
    for _ in range(100_000):  # bounded; each tick writes at least one batch or finishes
        written += tick(rt, budget=timedelta(seconds=30)).written
        with rt.engine.connect() as conn:
            row = campaigns.get(conn, campaign_id)
        if row.fanned_out_at is not None:
            break
    outcome: dict[str, Any] = {"written": written, "seconds": time.monotonic() - started}
    result.write_text(json.dumps(outcome))
    time.sleep(LINGER)  # stay alive so the driver can read this process's CPU; it stops us


def main() -> None:
    """Run the fan-out side of the scenario."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    fan_out(args.database_url, args.redis, args.ready, args.go, args.result)


if __name__ == "__main__":
    main()
