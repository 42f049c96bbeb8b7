"""The default deployment, run as a user runs it: the Procfile's commands, DKIM on.

The Procfile's ``web``, ``worker`` and ``scheduler`` lines run exactly as written (through
``bash -c``, with the project's interpreter first on PATH and ``PORT`` set), with nothing
but the settings a user must give: database, Redis, relay, secret, sender, public URL,
postal address, templates and a DKIM key (``MAILER_DKIM_*``). Everything else keeps its
default (SMTP pool, uvicorn workers, dramatiq processes and threads). One deployment
serves three measured phases, against a fresh database per run: a SQLite file, or a new
database on a private PostgreSQL cluster (:mod:`bench.postgres`), as :class:`Database` says:

1. **single sends**: ``POST /v1/messages/batch`` (500 per request, 2 clients), from the
   first request to the sink's 250 for the last message;
2. **campaign**: ``POST /v1/campaigns`` to opted-in readers; the scheduler fans it out
   while the workers send, from the request to the last 250;
3. **latency**: small batches offered at half the rate phase 1 reached; for each queued
   message, the time from the API's 202 to the sink's 250 (p50, p99), and from the moment
   its request was sent. The first can be below zero: a worker may deliver a message
   before the client has read the 202 of its batch.

CPU per message is measured per process group (web, worker, scheduler, Redis, sink, and
on PostgreSQL the postmaster with every server process it forked). After each phase the
database must record as sent every message the sink took. On PostgreSQL the freshly seeded
tables are analysed after the warm-up, as autovacuum would have done within a minute in a
deployment that has been running (see ``_analyse``).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from bench import campaign, content, pipeline, postgres
from bench.peers import dkim_key
from bench.procs import ROOT, BenchError, Group, Proc, free_port, wait_until
from bench.stack import Config, Measurement, Sink, Window
from mailer.keys import create_key
from mailer.store.db import make_engine, refresh_statistics, upgrade
from mailer.store.schema import messages

PROCFILE = ROOT / "Procfile"
#: The Procfile processes this scenario runs (``inbound`` idles without an inbound domain).
PROCESSES = ("web", "worker", "scheduler")
#: Messages per request in the latency phase (an application sending as its events occur).
LATENCY_BATCH = 10
#: Concurrent senders in the latency phase: each waits for its 202 before its next batch,
#: so two could not offer more than 2 x 10 messages per request time (about 330 msg/s).
LATENCY_LANES = 8
#: Share of phase 1's rate offered in the latency phase.
LATENCY_LOAD = 0.5


@dataclass(frozen=True)
class Database:
    """Where deployment runs keep their data: a fresh database per run, and its server."""

    name: str
    #: (the run's work dir, a lowercase label unique to the run) -> a context manager
    #: yielding the SQLAlchemy URL of an empty database, removed on exit if need be.
    fresh: Callable[[Path, str], AbstractContextManager[str]]
    #: The server's root process (PostgreSQL's postmaster): it and every process below it
    #: are measured as the group named after the database. None: no server (SQLite).
    server_pid: int | None = None
    #: One line on the engine and its durability settings, for the printed summary.
    describe: str = ""


def _sqlite_file(work: Path, label: str) -> AbstractContextManager[str]:
    del label  # one file per run directory
    return contextlib.nullcontext(f"sqlite:///{work / 'mailer.db'}")


#: The default: a SQLite file in the run's directory, with the pragmas of mailer.store.db.
SQLITE = Database("sqlite", _sqlite_file,
                  describe="SQLite file per run (WAL, synchronous=NORMAL: no fsync per commit)")


def database(name: str, stack: contextlib.ExitStack) -> Database:
    """The database ``name`` (sqlite, postgresql); a PostgreSQL cluster joins ``stack``."""
    if name == "sqlite":
        return SQLITE
    cluster = stack.enter_context(postgres.cluster())
    return Database("postgresql", lambda _work, label: cluster.fresh_database(label),
                    server_pid=cluster.pid, describe=cluster.describe())


def procfile() -> dict[str, str]:
    """The Procfile's commands by process name."""
    commands: dict[str, str] = {}
    for line in PROCFILE.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.lstrip().startswith("#"):
            commands[name.strip()] = command.strip()
    missing = [name for name in PROCESSES if name not in commands]
    if missing:
        raise BenchError(f"the Procfile has no {', '.join(missing)} process")
    return commands


def environment(cfg: Config, db_url: str, smtp_port: int, templates: Path, work: Path,
                port: int) -> dict[str, str]:
    """What a user sets: the required settings and DKIM, nothing tuned."""
    env = pipeline.mailer_env(cfg, db_url, smtp_port, templates)
    del env["MAILER_SMTP_POOL_SIZE"]  # the default pool
    key_file = work / "dkim.pem"
    dkim_key(key_file)
    bin_dir = str(Path(sys.executable).parent)
    env.update({
        "MAILER_DKIM_DOMAIN": content.DKIM_DOMAIN,
        "MAILER_DKIM_SELECTOR": content.DKIM_SELECTOR,
        "MAILER_DKIM_PRIVATE_KEY_FILE": str(key_file),
        "PORT": str(port),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


def _count_sent(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(messages)
                                .where(messages.c.status == "sent")).scalar_one())


def _wait_sent(db_url: str, total: int, timeout: float) -> None:
    """The database records every message the sink took (nothing skipped for speed)."""
    engine = make_engine(db_url, pool_size=1)
    try:
        wait_until(f"{total} messages recorded as sent", lambda: _count_sent(engine) >= total,
                   timeout, interval=0.1)
        found = _count_sent(engine)
    finally:
        engine.dispose()
    if found != total:
        raise BenchError(f"database has {found} messages sent, the sink took {total}")


def _continue_ids(db_url: str) -> None:
    """Move PostgreSQL's recipients.id sequence past ids that seeding gave explicitly.

    The campaign readers are inserted with their ids; a serial column's sequence does not
    see those, and the next insert without an id (the single-send seeding) would collide.
    """
    if make_url(db_url).get_backend_name() != "postgresql":
        return
    engine = make_engine(db_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT setval(pg_get_serial_sequence('recipients', 'id'), "
                              "(SELECT max(id) FROM recipients))"))
    finally:
        engine.dispose()


def _analyse(db_url: str) -> None:
    """Give PostgreSQL's planner the statistics a running deployment has.

    The run seeds tens of thousands of rows into new tables seconds before it measures.
    Until autovacuum's first ANALYZE (up to a minute later), the planner has no statistics
    for them and picks sequential scans for the workers' batched lookups (``email_hash IN
    (...)`` on suppressions: 3.0 ms instead of 0.3 ms for 100 keys), which a deployment
    that has been up for a minute no longer does. Nothing happens on SQLite.
    """
    engine = make_engine(db_url, pool_size=1)
    try:
        refresh_statistics(engine)
    finally:
        engine.dispose()


def _marketing_key(db_url: str) -> str:
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            return create_key(conn, "bench-marketing", ["marketing"])
    finally:
        engine.dispose()


def _paced(base: str, key: str, label: str, count: int, rate: float,
           ) -> tuple[dict[str, tuple[float, float]], float]:
    """Offer ``count`` messages at ``rate``/s in small batches from several threads.

    Returns the request and 202 times of each queued message by address, and the rate
    achieved.
    """
    accepted: dict[str, tuple[float, float]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    batches = [list(range(start, min(start + LATENCY_BATCH, count)))
               for start in range(0, count, LATENCY_BATCH)]
    began = time.monotonic() + 0.2
    interval = LATENCY_BATCH / rate

    def sender(lane: int) -> None:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        with httpx.Client(base_url=base, timeout=120.0) as http:
            for number in range(lane, len(batches), LATENCY_LANES):
                delay = began + number * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                items: list[dict[str, Any]] = [
                    {"template": content.TEMPLATE, "to": content.address(label, i),
                     "data": content.data(i)} for i in batches[number]]
                sent = time.monotonic()
                response = http.post("/v1/messages/batch", headers=headers,
                                     content=json.dumps({"messages": items}).encode())
                done = time.monotonic()
                with lock:
                    if response.status_code != 202:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                        return
                    for item, result in zip(items, response.json()["results"], strict=True):
                        if result.get("status") == "queued":
                            accepted[item["to"]] = (sent, done)

    threads = [threading.Thread(target=sender, args=(lane,)) for lane in range(LATENCY_LANES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    if failures:
        raise BenchError(f"batch API refused a batch: {failures[0]}")
    return accepted, count / max(time.monotonic() - began, 1e-9)


def _latencies(arrivals: Path, accepted: dict[str, tuple[float, float]], which: int,
               ) -> list[float]:
    """Milliseconds to each message's 250 at the sink from its request (``which`` 0) or
    its 202 (``which`` 1)."""
    arrived: dict[str, float] = {}
    for line in arrivals.read_text().splitlines():
        when, _, who = line.partition(" ")
        if who in accepted:
            arrived[who] = float(when)
    missing = len(accepted) - len(arrived)
    if missing:
        raise BenchError(f"{missing} accepted messages never reached the sink")
    return [(arrived[who] - accepted[who][which]) * 1000 for who in accepted]


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile (0-1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def run(cfg: Config, sink_kind: str, index: int, database: Database = SQLITE,
        ) -> list[Measurement]:
    """One run of the default deployment: single sends, a campaign, latency at half load."""
    work = cfg.work / f"deployment-{database.name}-{sink_kind}-{index}"
    work.mkdir(parents=True)
    with database.fresh(work, f"deployment_{sink_kind}_{index}") as db_url:
        results = _run(cfg, sink_kind, index, work, db_url, database)
    for m in results:
        m.database = database.name
    return results


def _run(cfg: Config, sink_kind: str, index: int, work: Path, db_url: str,
         database: Database) -> list[Measurement]:
    upgrade(db_url)  # what `mailer db upgrade` does before the first start
    label, late = f"d{index}{sink_kind[0]}", f"l{index}{sink_kind[0]}"
    latency_count = max(cfg.messages // 2, 500)
    readers_suppressed = campaign._seed(db_url, pipeline.SECRET, cfg.messages)
    _continue_ids(db_url)
    key, suppressed = pipeline._seed(db_url, label, cfg.messages, cfg.warmup)
    late_key, _ = pipeline._seed(db_url, late, latency_count, 0)
    marketing = _marketing_key(db_url)
    templates = content.lay_templates(ROOT / "templates", work / "templates")
    warm_bodies = pipeline._bodies(f"warm{label}", cfg.warmup, cfg.batch)
    bodies = pipeline._bodies(label, cfg.messages, cfg.batch)
    expected = cfg.messages - suppressed
    campaign_expected = cfg.messages - readers_suppressed

    arrivals = work / "arrivals.txt"
    sink = Sink(sink_kind, work, arrivals=arrivals)
    port = free_port()
    env = environment(cfg, db_url, sink.port, templates, work, port)
    commands = procfile()
    procs: dict[str, Proc] = {}
    try:
        for name in PROCESSES:
            procs[name] = Proc(name, ["bash", "-c", commands[name]], env,
                               log=work / f"{name}.log")

        def check() -> None:
            for proc in procs.values():
                proc.check()

        base = f"http://127.0.0.1:{port}"
        wait_until("web start", lambda: pipeline._healthy(base, procs["web"]), 60)
        groups = {"worker": Group("worker", [procs["worker"].pid]),
                  "api": Group("api", [procs["web"].pid]),
                  "scheduler": Group("scheduler", [procs["scheduler"].pid]),
                  "redis": Group("redis", [cfg.redis_pid]),
                  "sink": Group("sink", [sink.proc.pid]),
                  "client": Group("client", [os.getpid()], tree=False)}
        if database.server_pid is not None:
            # The postmaster forks a backend per connection and its background writers;
            # they are all below it, so its process tree is the server's whole CPU.
            groups[database.name] = Group(database.name, [database.server_pid])
        note = (f"Procfile as shipped ({', '.join(PROCESSES)}), DKIM rsa-sha256 on, "
                f"default pool and processes, {database.name}")
        # Warm-up: forks done, imports loaded, SMTP pools open, database pages cached.
        pipeline._post_all(base, key, warm_bodies, 1)
        sink.wait_for(cfg.warmup, cfg.timeout, check)
        _wait_sent(db_url, cfg.warmup, cfg.timeout)
        _analyse(db_url)
        results: list[Measurement] = []

        # 1. single sends through the batch API
        window = Window(groups)
        start = time.monotonic()
        pipeline._check_statuses(pipeline._post_all(base, key, bodies, cfg.clients),
                                 expected, suppressed)
        last = sink.wait_for(cfg.warmup + expected, cfg.timeout, check)
        cpu, rss = window.close()
        single = Measurement("deployment: single sends", sink_kind, expected, last - start,
                             cpu, rss, note=note, background=window.background)
        results.append(single)
        _wait_sent(db_url, cfg.warmup + expected, cfg.timeout)

        # 2. a campaign, fanned out by the scheduler process
        before = sink.count()
        shared = {k: v for k, v in content.data(0).items() if k != "name"}
        window = Window(groups)
        start = time.monotonic()
        response = httpx.post(f"{base}/v1/campaigns", timeout=60.0,
                              headers={"Authorization": f"Bearer {marketing}"},
                              json={"name": "bench", "template": content.CAMPAIGN_TEMPLATE,
                                    "topic": "newsletter", "data": shared})
        if response.status_code != 201:
            raise BenchError(f"campaign refused: {response.status_code} {response.text[:200]}")
        last = sink.wait_for(before + campaign_expected, cfg.timeout, check)
        cpu, rss = window.close()
        results.append(Measurement("deployment: campaign", sink_kind, campaign_expected,
                                   last - start, cpu, rss, note=note,
                                   background=window.background))
        _wait_sent(db_url, cfg.warmup + expected + campaign_expected, cfg.timeout)

        # 3. latency from the 202 to the 250, at half the single-send rate
        before = sink.count()
        rate = max(single.rate * LATENCY_LOAD, 10.0)
        window = Window(groups)
        accepted, offered = _paced(base, late_key, late, latency_count, rate)
        sink.wait_for(before + len(accepted), cfg.timeout, check)
        cpu, rss = window.close()
        waited = _latencies(arrivals, accepted, 1)
        requested = _latencies(arrivals, accepted, 0)
        _wait_sent(db_url, cfg.warmup + expected + campaign_expected + len(accepted),
                   cfg.timeout)
        results.append(Measurement(
            "deployment: 50 % load", sink_kind, len(accepted), latency_count / offered, cpu,
            rss, note=f"batches of {LATENCY_BATCH} from {LATENCY_LANES} clients, "
                      f"{rate:,.0f} msg/s asked",
            background=window.background,
            latency={"p50_ms": percentile(waited, 0.50), "p99_ms": percentile(waited, 0.99),
                     "mean_ms": statistics.fmean(waited), "offered": rate,
                     "request_p50_ms": percentile(requested, 0.50),
                     "request_p99_ms": percentile(requested, 0.99)},
        ))
        return results
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()
        sink.stop()
