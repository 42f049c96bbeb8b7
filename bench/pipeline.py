"""Our pipeline: batch API (uvicorn) -> SQLite outbox -> Redis -> dramatiq workers -> sink.

Each run gets a fresh, migrated SQLite database seeded with the recipients (service
alerts need an active account), a suppression list (5 % of the run's addresses plus
unrelated entries, so lookups find something) and an API key. The clock runs from the
first POST to the sink's 250 for the last expected message; afterwards the database must
show every queued message ``sent`` and every suppressed one ``suppressed``.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, insert, select

from bench import content
from bench.procs import ROOT, BenchError, Group, Proc, free_port, python, wait_until
from bench.sinks import read_status
from bench.stack import Config, Measurement, Profiler, Sink, Window
from mailer.keys import create_key
from mailer.store.db import make_engine, upgrade
from mailer.store.schema import messages, recipients, suppressions
from suppression.addresses import address_hash, normalise

SECRET = "bench-secret-key-0123456789abcdef"
#: Share of the run's addresses on the suppression list (the reference runs used 5 %).
SUPPRESSED_EVERY = 20
#: Suppression entries for addresses nobody sends to, so the index is not trivially empty.
UNRELATED_SUPPRESSIONS = 20_000


def mailer_env(cfg: Config, db_url: str, smtp_port: int, templates: Path) -> dict[str, str]:
    """The ``MAILER_*`` environment shared by the API and the workers."""
    return {
        "MAILER_ENV": "production",
        "MAILER_SECRET_KEY": SECRET,
        "MAILER_DATABASE_URL": db_url,
        "MAILER_REDIS_URL": cfg.redis_url,
        "MAILER_SMTP_HOST": "127.0.0.1",
        "MAILER_SMTP_PORT": str(smtp_port),
        "MAILER_SMTP_SECURITY": "none",
        "MAILER_SMTP_POOL_SIZE": str(cfg.pool_size),
        "MAILER_FROM": content.MAIL_FROM,
        "MAILER_PUBLIC_URL": "https://mail.example.test",
        "MAILER_POSTAL_ADDRESS": "Example Ltd, 1 Example Street, 00000 Example City",
        "MAILER_TEMPLATES_DIR": str(templates),
    }


def _seed(db_url: str, run: str, count: int, warmup: int) -> tuple[str, int]:
    """Recipients, suppressions and a key; return the key and how many sends are suppressed."""
    key_bytes = SECRET.encode()
    now = datetime.now(UTC)
    engine = make_engine(db_url)
    suppressed = 0
    with engine.begin() as conn:
        key = create_key(conn, "bench", ["messages:transactional"])
        people: list[dict[str, Any]] = []
        blocked: list[dict[str, Any]] = []
        for label, total in ((run, count), (f"warm{run}", warmup)):
            for i in range(total):
                email = normalise(content.address(label, i))
                digest = address_hash(email, key_bytes)
                people.append({
                    "external_id": f"{label}-{i}", "email": email, "email_hash": digest,
                    "name": f"Customer {i}", "attributes": {}, "account_active": True,
                    "created_at": now, "updated_at": now,
                })
                if label == run and i % SUPPRESSED_EVERY == 7:
                    suppressed += 1
                    blocked.append({"email": None, "email_hash": digest, "scope": "all",
                                    "reason": "hard_bounce", "source": "bench", "created_at": now})
        blocked += [
            {"email": None, "email_hash": secrets.token_hex(32), "scope": "all",
             "reason": "hard_bounce", "source": "bench", "created_at": now}
            for _ in range(UNRELATED_SUPPRESSIONS)
        ]
        conn.execute(insert(recipients), people)
        conn.execute(insert(suppressions), blocked)
    engine.dispose()
    return key, suppressed


def _bodies(label: str, count: int, batch: int) -> list[bytes]:
    bodies = []
    for start in range(0, count, batch):
        items = [
            {"template": content.TEMPLATE, "to": content.address(label, i), "data": content.data(i)}
            for i in range(start, min(start + batch, count))
        ]
        bodies.append(json.dumps({"messages": items}).encode())
    return bodies


def _post_all(base: str, key: str, bodies: list[bytes], clients: int) -> Counter[str]:
    """POST the batches from ``clients`` threads; return the statuses the API answered."""
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    shares = [bodies[i::clients] for i in range(clients)]

    def post(share: list[bytes]) -> None:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        with httpx.Client(base_url=base, timeout=120.0) as http:
            for body in share:
                response = http.post("/v1/messages/batch", content=body, headers=headers)
                with lock:
                    if response.status_code != 202:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                        return
                    statuses.update(r.get("status", "error") for r in response.json()["results"])

    threads = [threading.Thread(target=post, args=(s,)) for s in shares if s]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if failures:
        raise BenchError(f"batch API refused a batch: {failures[0]}")
    return statuses


def run(cfg: Config, sink_kind: str, index: int) -> Measurement:
    """One measured run of the pipeline against a fresh database."""
    return _run(cfg, sink_kind, index, drain=False)


def drain(cfg: Config, sink_kind: str, index: int) -> Measurement:
    """The send stage alone: everything is accepted first, then the workers start.

    The clock runs from the sink's first message to its last, so worker start-up is not
    counted; the API is idle meanwhile. This isolates what the workers can do.
    """
    return _run(cfg, sink_kind, index, drain=True)


def _run(cfg: Config, sink_kind: str, index: int, *, drain: bool) -> Measurement:
    scenario = "worker drain" if drain else "pipeline"
    work = cfg.work / f"{scenario.replace(' ', '-')}-{sink_kind}-{index}"
    work.mkdir(parents=True)
    db_url = f"sqlite:///{work / 'mailer.db'}"
    upgrade(db_url)
    label = f"r{index}{sink_kind[0]}"
    key, suppressed = _seed(db_url, label, cfg.messages, cfg.warmup)
    templates = content.lay_templates(ROOT / "templates", work / "templates")
    warm_bodies = _bodies(f"warm{label}", cfg.warmup, cfg.batch)
    bodies = _bodies(label, cfg.messages, cfg.batch)
    expected = cfg.messages - suppressed

    sink = Sink(sink_kind, work)
    api_port = free_port()
    env = mailer_env(cfg, db_url, sink.port, templates)
    procs: list[Proc] = []
    try:
        api = Proc("api", [python(), "-m", "uvicorn", "--factory", "mailer.api.app:create_app",
                           "--host", "127.0.0.1", "--port", str(api_port), "--no-access-log",
                           "--log-level", "warning", "--workers", str(cfg.api_workers)],
                   env, log=work / "api.log")
        procs.append(api)
        base = f"http://127.0.0.1:{api_port}"
        wait_until("API start", lambda: _healthy(base, api), 30)
        if drain:
            _post_all(base, key, warm_bodies, 1)
            _check_statuses(_post_all(base, key, bodies, cfg.clients), expected, suppressed)
        worker = Proc("worker", [python(), "-m", "dramatiq", "workers.actors", "--processes",
                                 str(cfg.processes), "--threads", str(cfg.threads)],
                      env, log=work / "worker.log")
        procs.append(worker)

        def check() -> None:
            api.check()
            worker.check()

        groups = {"worker": Group("worker", [worker.pid]), "api": Group("api", [api.pid]),
                  "redis": Group("redis", [cfg.redis_pid]),
                  "sink": Group("sink", [sink.proc.pid]),
                  "client": Group("client", [os.getpid()], tree=False)}
        note = ""
        if drain:
            # The worker processes fork and import first; measure from the first 250.
            sink.wait_for(1, cfg.timeout, check)
            window = Window(groups, sink, cfg.timeline)
            profiler = Profiler(cfg.profile and cfg.profile / f"drain-{sink_kind}-{index}",
                                {"worker": worker.pid}, cfg.profile_mode)
            _, start, _ = read_status(sink.status)
            delivered = cfg.warmup + expected - 1
        else:
            # Warm-up: forks done, imports loaded, SMTP pools open, SQLite pages cached.
            _post_all(base, key, warm_bodies, 1)
            sink.wait_for(cfg.warmup, cfg.timeout, check)
            profiler = Profiler(cfg.profile and cfg.profile / f"pipeline-{sink_kind}-{index}",
                                {"worker": worker.pid, "api": api.pid}, cfg.profile_mode)
            window = Window(groups, sink, cfg.timeline)
            start = time.monotonic()
            _check_statuses(_post_all(base, key, bodies, cfg.clients), expected, suppressed)
            note = f"API accepted all in {time.monotonic() - start:.2f} s"
            delivered = expected
        last = sink.wait_for(cfg.warmup + expected, cfg.timeout, check)
        cpu, rss = window.close()
        profiler.stop()
        if cfg.timeline:
            print(window.timeline(), flush=True)
        _verify(db_url, cfg.warmup + expected, suppressed, cfg.timeout)
        if drain:
            del cpu["api"], rss["api"]
        return Measurement(scenario, sink_kind, delivered, last - start, cpu, rss, note=note,
                           background=window.background)
    finally:
        for proc in reversed(procs):
            proc.stop()
        sink.stop()


def _check_statuses(statuses: Counter[str], expected: int, suppressed: int) -> None:
    if statuses != Counter({"queued": expected, "suppressed": suppressed}):
        raise BenchError(f"unexpected acceptance results: {dict(statuses)}")


def _healthy(base: str, api: Proc) -> bool:
    api.check()
    try:
        return httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _verify(db_url: str, sent: int, suppressed: int, timeout: float) -> None:
    """Every message ends where it should: the speed bought no skipped step."""
    engine = make_engine(db_url)
    found: dict[str, int] = {}

    def settled() -> bool:
        nonlocal found
        with engine.connect() as conn:
            found = {
                row.status: int(row.n)
                for row in conn.execute(
                    select(messages.c.status, func.count().label("n")).group_by(messages.c.status)
                )
            }
        return found.get("sent", 0) >= sent

    try:
        wait_until("messages recorded as sent", settled, timeout, interval=0.1)
    finally:
        engine.dispose()
    if found != {"sent": sent, "suppressed": suppressed}:
        raise BenchError(f"database disagrees with the sink: {found}")
