"""Chaos on PostgreSQL: many processes, random SIGKILLs and a broker crash lose nothing.

The whole system as deployed, on one machine: 2 API processes (uvicorn), 4 worker
processes (dramatiq), 2 schedulers, a private PostgreSQL, a private Redis (the broker)
and a real SMTP server (aiosmtpd). A campaign fans out while single sends arrive over
HTTP; every few seconds a worker or a scheduler is SIGKILLed and started again, and once
Redis itself is SIGKILLed and restarted. Then:

- no accepted message is lost: every one reached the SMTP server at least once;
- duplicates stay within the documented bound: a worker killed between SMTP 250s and the
  commit of its slice resends at most one slice per thread (threads x slice per kill);
- the campaign's counts (``GET /v1/campaigns/{id}``) add up to its audience.

Size: a 20,000-recipient campaign plus 5,000 single sends, in full. On the 2-core machine
this was written on, the system sent about 470 messages a second while being killed, so
the test takes 60-70 s; a slower machine has :data:`DRAIN_TIMEOUT` to spare. Every loop is
bounded in count and time, and every process is stopped by its PID at the end, even on
failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, WorkerProcess, base_env, wait_for
from tests.services import (
    PostgresServer,
    RedisServer,
    free_port,
    postgres_available,
    redis_server_available,
    require,
)

pytestmark = pytest.mark.slow

#: Campaign audience and single sends.
CAMPAIGN = 20000
SINGLES = 5000
#: Single sends per API request.
BATCH = 50
WORKERS, THREADS, SLICE = 4, 4, 16
SCHEDULERS, APIS = 2, 2
#: Seconds between kills (uniform), and the most kills in one run.
KILL_EVERY = (2.0, 4.0)
MAX_KILLS = 40
#: The longest the test waits for everything to be sent after the chaos stops (seconds).
DRAIN_TIMEOUT = 150.0
#: Longest the chaos phase may last (seconds).
CHAOS_TIMEOUT = 150.0
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.MULTILINE | re.IGNORECASE)


def _group_kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and everything in its process group (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL of the group after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _group_kill(proc)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env,
                                                      "PYTHONPATH": str(ROOT)},
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


@dataclass
class Fleet:
    """Every process of the system under test, each restartable by slot."""

    env: dict[str, str]
    logs: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    schedulers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    apis: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api_urls: list[str] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)

    def start_worker(self) -> WorkerProcess:
        """A dramatiq worker process (1 process x THREADS threads)."""
        return WorkerProcess(self.env, processes=1, threads=THREADS)

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        """A scheduler process."""
        return _spawn([sys.executable, "-m", "workers.scheduler"], self.env,
                      self.logs / "scheduler.log")

    def start(self) -> None:
        """Start the APIs, the workers and the schedulers."""
        for _ in range(APIS):
            port = free_port()
            self.apis.append(_spawn(
                [sys.executable, "-m", "uvicorn", "--factory", "mailer.api.app:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
                self.env, self.logs / f"api-{port}.log"))
            self.api_urls.append(f"http://127.0.0.1:{port}")
        self.workers = [self.start_worker() for _ in range(WORKERS)]
        self.schedulers = [self.start_scheduler() for _ in range(SCHEDULERS)]
        for url in self.api_urls:
            wait_for(lambda u=url: _healthy(u), timeout=60, interval=0.2)

    def kill_one(self, rng: random.Random) -> str:
        """SIGKILL a worker (two kills in three) or a scheduler, at random among them, and
        start a new one in its place."""
        if sum(self.kills.values()) % 3 != 2:
            slot = rng.randrange(len(self.workers))
            self.workers[slot].kill()
            self.workers[slot] = self.start_worker()
            kind = "worker"
        else:
            slot = rng.randrange(len(self.schedulers))
            _group_kill(self.schedulers[slot])
            self.schedulers[slot] = self.start_scheduler()
            kind = "scheduler"
        self.kills[kind] += 1
        return kind

    def stop(self) -> None:
        """Stop every process by its PID (SIGTERM, then SIGKILL of its group)."""
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.stop()
            with contextlib.suppress(Exception):
                worker.kill()
        for proc in [*self.schedulers, *self.apis]:
            with contextlib.suppress(Exception):
                _stop(proc)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture()
def system(tmp_path: Path) -> Iterator[tuple[dict[str, str], Any, RedisServer, Path]]:
    """A private PostgreSQL, Redis and SMTP server, and the environment to use them."""
    from mailer.store.db import upgrade
    from tests.smtp_servers import running_smtp_server

    require("postgresql", postgres_available(), "PostgreSQL server binaries missing")
    require("redis-server", redis_server_available(), "redis-server is not installed")
    logs = tmp_path  # the API and scheduler logs, kept by pytest for a failed run
    with PostgresServer() as pg, RedisServer() as redis, \
            running_smtp_server() as (_, port, recorder):
        upgrade(pg.url)
        # A lease of 6 s: long enough that a live worker under this load renews it before
        # it runs out (at half), short enough that a killed worker's rows come back soon.
        env = base_env(pg.url, redis.url, port, MAILER_SEND_LEASE="6s",
                       MAILER_SWEEP_INTERVAL="1s", WEB_CONCURRENCY="1")
        yield env, recorder, redis, logs


def seed_audience(rt: Any, cohort: str, count: int) -> None:
    """Insert ``count`` recipients with a newsletter grant each, in bulk."""
    from sqlalchemy import insert, select

    from mailer.store.schema import consent_events, recipients

    now = rt.clock()
    rows = [{
        "external_id": f"{cohort}-{n}", "email": f"{cohort}-{n}@example.org",
        "email_hash": rt.hash_email(f"{cohort}-{n}@example.org"), "name": f"Person {n}",
        "attributes": {"cohort": cohort}, "account_active": True,
        "created_at": now, "updated_at": now,
    } for n in range(count)]
    with rt.engine.begin() as conn:
        conn.execute(insert(recipients), rows)
        ids = conn.execute(select(recipients.c.id, recipients.c.email_hash)
                           .where(recipients.c.external_id.like(f"{cohort}-%"))).all()
        conn.execute(insert(consent_events), [
            {"recipient_id": r.id, "email_hash": r.email_hash, "topic": "newsletter",
             "granted": True, "source": "signup_form", "policy_version": "1",
             "occurred_at": now - timedelta(days=1), "recorded_at": now,
             "evidence": {"form": "https://example.test/signup"}} for r in ids])


def send_singles(urls: list[str], key: str, count: int, accepted: list[str],
                 errors: list[str], stop: threading.Event) -> None:
    """POST ``count`` registration confirmations in batches, alternating the APIs."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=30) as client:
        for n, start in enumerate(range(0, count, BATCH)):
            if stop.is_set():
                return
            batch = [{"template": "registration_confirmation",
                      "to": f"single-{uuid.uuid4().hex[:12]}@example.org",
                      "data": {"name": "S", "confirm_url": "https://example.test/c"}}
                     for _ in range(min(BATCH, count - start))]
            try:
                r = client.post(f"{urls[n % len(urls)]}/v1/messages/batch", headers=headers,
                                json={"messages": batch})
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            if r.status_code != 202:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                continue
            accepted += [res["id"] for res in r.json()["results"] if res.get("id")]


def delivered(recorder: Any) -> Counter[bytes]:
    """How often the SMTP server received each Message-ID."""
    counts: Counter[bytes] = Counter()
    for message in recorder.messages:
        match = _MESSAGE_ID.search(message.data)
        if match:
            counts[match.group(1)] += 1
    return counts


def test_chaos_on_postgres_loses_nothing(
    system: tuple[dict[str, str], Any, RedisServer, Path]
) -> None:
    from sqlalchemy import func, select

    from mailer.config import Settings
    from mailer.keys import create_key
    from mailer.runtime import Runtime
    from mailer.sending.queue import ListEnqueuer
    from mailer.store.schema import messages

    env, recorder, redis, logs = system
    rt = Runtime.from_settings(Settings.from_environ(env), ListEnqueuer())
    cohort = f"chaos{uuid.uuid4().hex[:6]}"
    with rt.engine.begin() as conn:
        marketing = create_key(conn, "chaos-marketing", ["marketing"])
        transactional = create_key(conn, "chaos-transactional", ["messages:transactional"])
    # Given an audience of CAMPAIGN opted-in people, and the whole system running
    seed_audience(rt, cohort, CAMPAIGN)
    fleet = Fleet(env, logs)
    rng = random.Random(int(os.environ.get("MAILER_CHAOS_SEED", "20240607")))
    stop_sending = threading.Event()
    sender: threading.Thread | None = None
    started = time.monotonic()
    try:
        fleet.start()
        # When a campaign to all of them starts
        r = httpx.post(f"{fleet.api_urls[0]}/v1/campaigns", timeout=30,
                       headers={"Authorization": f"Bearer {marketing}"},
                       json={"name": "chaos", "template": "newsletter", "topic": "newsletter",
                             "data": {"headline": "Chaos", "body": "Nothing is lost."},
                             "audience": {"attributes": {"cohort": cohort}}})
        assert r.status_code == 201, r.text
        campaign_id = r.json()["id"]
        # And single sends arrive over HTTP meanwhile, through both API processes
        accepted: list[str] = []
        errors: list[str] = []
        sender = threading.Thread(target=send_singles, args=(
            fleet.api_urls, transactional, SINGLES, accepted, errors, stop_sending))
        sender.start()

        # And every few seconds a worker or a scheduler is SIGKILLed and replaced, and
        # once, about a third of the way in, Redis is SIGKILLed and restarted a second later
        def campaign_written() -> int:
            with rt.engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(messages).where(
                    messages.c.campaign_id == campaign_id)).scalar_one())

        redis_restarted = False
        chaos_start = time.monotonic()
        chaos_end = chaos_start + CHAOS_TIMEOUT
        while sum(fleet.kills.values()) < MAX_KILLS and time.monotonic() < chaos_end:
            time.sleep(rng.uniform(*KILL_EVERY))
            fleet.kill_one(rng)
            sent_so_far = sum(delivered(recorder).values())
            # A third of the way in, or after 30 s on a machine slower than expected.
            if not redis_restarted and (sent_so_far >= (CAMPAIGN + SINGLES) // 3
                                        or time.monotonic() - chaos_start > 30):
                redis.kill()
                time.sleep(1.0)
                redis.start()
                redis_restarted = True
            if (redis_restarted and not sender.is_alive()
                    and campaign_written() >= CAMPAIGN
                    and sent_so_far >= (CAMPAIGN + SINGLES) * 0.8):
                break
        chaos_seconds = time.monotonic() - started
        sender.join(timeout=60)
        assert not sender.is_alive(), "single sends did not finish"
        assert redis_restarted, "the run ended before the broker restart"

        # Then, once the survivors have drained the outbox, everything was sent
        def pending() -> int:
            with rt.engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(messages).where(
                    messages.c.status.not_in(["sent", "suppressed", "failed"]))).scalar_one())

        wait_for(lambda: pending() == 0 and campaign_written() == CAMPAIGN,
                 timeout=DRAIN_TIMEOUT, interval=0.5)
        total_seconds = time.monotonic() - started
        with rt.engine.connect() as conn:
            rows = conn.execute(select(messages.c.message_id_header, messages.c.status,
                                       messages.c.campaign_id)).all()

        def campaign_view() -> dict[str, Any]:
            r = httpx.get(f"{fleet.api_urls[1]}/v1/campaigns/{campaign_id}", timeout=30,
                          headers={"Authorization": f"Bearer {marketing}"})
            assert r.status_code == 200, r.text
            return dict(r.json())

        # A scheduler marks it completed on its next tick after the last message is final.
        campaign = wait_for(lambda: (c := campaign_view())["status"] == "completed" and c,
                            timeout=30, interval=0.25)
    finally:
        stop_sending.set()
        if sender is not None:
            sender.join(timeout=60)
        fleet.stop()

    received = delivered(recorder)
    allowed = {r.message_id_header.encode() for r in rows if r.status == "sent"}
    lost = [mid for mid in allowed if mid not in received]
    duplicates = sum(n - 1 for mid, n in received.items() if mid in allowed)
    bound = fleet.kills["worker"] * THREADS * SLICE
    statuses = Counter(r.status for r in rows)
    print(f"\nchaos: campaign={CAMPAIGN} singles_accepted={len(accepted)} "
          f"api_errors={len(errors)} rows={len(rows)} states={dict(statuses)} "
          f"kills={dict(fleet.kills)} redis_restarts=1 delivered={sum(received.values())} "
          f"lost={len(lost)} duplicates={duplicates} bound={bound} "
          f"chaos_s={chaos_seconds:.0f} total_s={total_seconds:.0f} "
          f"msg_per_s={len(rows) / total_seconds:.0f}")
    # No accepted request failed, and every accepted message was allowed and sent
    assert not errors, errors[:5]
    assert len(accepted) == SINGLES
    assert statuses == Counter({"sent": CAMPAIGN + SINGLES})
    # And every one of them reached the SMTP server at least once
    assert not lost
    # And duplicates stay within threads x slice per killed worker
    assert duplicates <= bound
    # And the campaign's counts add up: all sent, nothing pending, the audience in full
    counts = campaign["counts"]
    assert counts["audience"] == CAMPAIGN
    assert counts["sent"] == CAMPAIGN
    states = ("queued", "sent", "suppressed", "failed", "bounced", "complained", "unknown",
              "cancelled", "held")
    assert sum(counts[k] for k in states) == CAMPAIGN
    assert counts["queued"] == 0
    # And it completed, though its two schedulers were killed now and then
    assert campaign["status"] == "completed"
