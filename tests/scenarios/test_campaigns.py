"""Campaigns: scheduler -> fan-out -> Redis -> real worker -> real SMTP sink (SPEC 7, 9).

Every test gets a database of its own, so the audience, the counts and the sink hold only
what that test made. The integration tests also get their own Redis and SMTP server.
"""

from __future__ import annotations

import email
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from email import policy
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, WorkerProcess, auth, base_env, wait_for
from tests.services import RedisServer, redis_server_available, require

HARD, COMPLAINT, MANUAL = "hard_bounce", "complaint", "manual"
#: Suppressions planted on some opted-in people: (reason, scope).
PLANTED = {HARD: "all", COMPLAINT: "marketing", MANUAL: "all"}
UNSUBSCRIBE = re.compile(r"^<https://mail\.example\.test(/u/[A-Za-z0-9_.-]+)>$")


# --- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture()
def fresh_db(db_url: str, tmp_path: Path) -> str:
    """An empty, migrated database of this test's own (SQLite file or PostgreSQL)."""
    import psycopg
    from sqlalchemy import make_url

    from mailer.store.db import upgrade

    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        fresh = f"sqlite:///{tmp_path / 'campaigns.db'}"
    else:
        name = f"campaign_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(host=url.host, port=url.port, user=url.username,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        fresh = url.set(database=name).render_as_string(hide_password=False)
    upgrade(fresh)
    return fresh


@dataclass
class Stack:
    """One test's system: environment, runtime, HTTP client, SMTP recorder and keys."""

    env: dict[str, str]
    rt: Any
    client: Any
    recorder: Any
    keys: dict[str, str]


@contextmanager
def _stack(env: dict[str, str], recorder: Any, enqueuer: Any = None) -> Iterator[Stack]:
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.keys import create_key
    from mailer.runtime import Runtime

    rt = Runtime.from_settings(Settings.from_environ(env), enqueuer)
    with rt.engine.begin() as conn:
        keys = {role: create_key(conn, role, scopes) for role, scopes in (
            ("marketing", ["marketing"]), ("recipients", ["recipients"]),
            ("transactional", ["messages:transactional"]))}
    with TestClient(create_app(rt)) as client:
        yield Stack(env, rt, client, recorder, keys)
    rt.engine.dispose()


@pytest.fixture()
def local(fresh_db: str) -> Iterator[Stack]:
    """No Redis, no SMTP: the runtime enqueues into a list (for state-machine tests)."""
    from mailer.sending.queue import ListEnqueuer

    env = base_env(fresh_db, "redis://127.0.0.1:1/0", 1)
    with _stack(env, None, ListEnqueuer()) as stack:
        yield stack


@pytest.fixture()
def stack(fresh_db: str) -> Iterator[Stack]:
    """Its own Redis and SMTP server: the sink sees only this test's mail."""
    from tests.smtp_servers import running_smtp_server

    require("redis-server", redis_server_available(), "redis-server is not installed")
    with RedisServer() as redis, running_smtp_server() as (_, port, recorder):
        env = base_env(fresh_db, redis.url, port)
        with _stack(env, recorder) as built:
            yield built
            built.rt.enqueuer.close()


@dataclass(frozen=True)
class Person:
    """One generated recipient and what the test planted for them."""

    n: int
    id: int
    external_id: str
    email: str
    name: str
    opted_in: bool
    suppressed: str | None


def add_people(
    rt: Any, count: int, cohort: str, *,
    opted_in: Callable[[int], bool] = lambda n: True,
    suppressed: Callable[[int], str | None] = lambda n: None,
) -> list[Person]:
    """Insert recipients, their newsletter grants and suppressions in bulk."""
    from sqlalchemy import insert, select

    from mailer.store.schema import consent_events, recipients, suppressions

    now = rt.clock()
    rows = [{
        "external_id": f"{cohort}-{n}", "email": f"{cohort}-{n}@example.org",
        "email_hash": rt.hash_email(f"{cohort}-{n}@example.org"), "name": f"Person {n}",
        "attributes": {"cohort": cohort, "n": n}, "account_active": True,
        "created_at": now, "updated_at": now,
    } for n in range(count)]
    with rt.engine.begin() as conn:
        conn.execute(insert(recipients), rows)
        ids = {r.external_id: r.id for r in conn.execute(
            select(recipients.c.external_id, recipients.c.id)
            .where(recipients.c.external_id.like(f"{cohort}-%")))}
        people = [Person(n, ids[r["external_id"]], r["external_id"], r["email"], r["name"],
                         opted_in(n), suppressed(n) if opted_in(n) else None)
                  for n, r in enumerate(rows)]
        grants = [{"recipient_id": p.id, "email_hash": rt.hash_email(p.email),
                   "topic": "newsletter", "granted": True, "source": "signup_form",
                   "policy_version": "1", "occurred_at": now - timedelta(days=1),
                   "recorded_at": now, "evidence": {"form": "https://example.test/signup"}}
                  for p in people if p.opted_in]
        if grants:
            conn.execute(insert(consent_events), grants)
        blocks = [{"email": p.email, "email_hash": rt.hash_email(p.email),
                   "scope": PLANTED[p.suppressed], "reason": p.suppressed, "source": "test",
                   "created_at": now} for p in people if p.suppressed]
        if blocks:
            conn.execute(insert(suppressions), blocks)
    return people


def create(stack: Stack, cohort: str, **body: Any) -> str:
    """POST /v1/campaigns for the cohort; return the id."""
    payload = {"name": f"campaign {cohort}", "template": "newsletter", "topic": "newsletter",
               "data": {"headline": "Spring news", "body": "All about spring."},
               "audience": {"attributes": {"cohort": cohort}}, **body}
    r = stack.client.post("/v1/campaigns", json=payload, headers=auth(stack.keys["marketing"]))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "scheduled"
    return str(r.json()["id"])


def show(stack: Stack, campaign_id: str) -> dict[str, Any]:
    """GET /v1/campaigns/{id}."""
    r = stack.client.get(f"/v1/campaigns/{campaign_id}", headers=auth(stack.keys["marketing"]))
    assert r.status_code == 200, r.text
    return dict(r.json())


def act(stack: Stack, campaign_id: str, action: str) -> Any:
    """POST pause, resume or cancel."""
    return stack.client.post(f"/v1/campaigns/{campaign_id}/{action}",
                             headers=auth(stack.keys["marketing"]))


def mails(stack: Stack) -> list[Any]:
    """Everything the SMTP sink accepted, parsed."""
    return [email.message_from_bytes(m.data, policy=policy.default)
            for m in list(stack.recorder.messages)]


def delivered_to(stack: Stack) -> Counter[str]:
    """How many mails each address received."""
    return Counter(m["To"].addresses[0].addr_spec for m in mails(stack))


@contextmanager
def scheduler_thread(env: dict[str, str]) -> Iterator[None]:
    """The real scheduler loop, in this process."""
    from mailer.config import Settings
    from workers.scheduler import run

    stop = threading.Event()
    thread = threading.Thread(target=run, args=(Settings.from_environ(env), stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)


def scheduler_process(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The real scheduler as its own process (so it can be SIGKILLed)."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers.scheduler"], cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def sentinel_delivered(stack: Stack) -> None:
    """Send one transactional mail and wait for it: the worker has drained what came first."""
    address = f"sentinel-{uuid.uuid4().hex[:8]}@example.org"
    r = stack.client.post("/v1/messages", headers=auth(stack.keys["transactional"]), json={
        "template": "registration_confirmation", "to": address,
        "data": {"name": "S", "confirm_url": "https://example.test/c"}})
    assert r.status_code == 202, r.text
    wait_for(lambda: delivered_to(stack)[address] == 1, timeout=30, interval=0.02)


def campaign_mail(stack: Stack) -> Counter[str]:
    """Deliveries of campaign mail (the sentinels left out)."""
    return Counter({k: v for k, v in delivered_to(stack).items()
                    if not k.startswith("sentinel-")})


# --- the done-when test --------------------------------------------------------------------


def test_campaign_reaches_exactly_the_allowed_set(stack: Stack) -> None:
    from sqlalchemy import insert

    from mailer.store.schema import recipients

    rt, client, keys = stack.rt, stack.client, stack.keys
    cohort = f"c{uuid.uuid4().hex[:8]}"
    # Given 2,000 recipients, a third opted in to the newsletter, and some of those
    # suppressed for other reasons (hard bounce, complaint, manual block)
    reasons = {0: HARD, 3: COMPLAINT, 6: MANUAL}
    people = add_people(rt, 2000, cohort, opted_in=lambda n: n % 3 == 0,
                        suppressed=lambda n: reasons.get(n % 60))
    # And people outside the audience who opted in too
    add_people(rt, 30, f"{cohort}x")
    # And a second profile with the address of an allowed person: one message, not two
    allowed = [p for p in people if p.opted_in and not p.suppressed]
    twin = allowed[0]
    with rt.engine.begin() as conn:
        now = rt.clock()
        conn.execute(insert(recipients).values(
            external_id=f"{twin.external_id}-twin", email=twin.email,
            email_hash=rt.hash_email(twin.email), name="Twin", account_active=True,
            attributes={"cohort": cohort}, created_at=now, updated_at=now))
    # And a stored marketing template that reads the profile and the campaign's data
    r = client.put(f"/v1/templates/spring-{cohort}", headers=auth(keys["marketing"]), json={
        "category": "promotion", "topic": "newsletter", "subject": "{{ headline }}",
        "html": "<p>Hello {{ name }} (#{{ attributes.n }}): {{ headline }}. {{ body }}</p>"})
    assert r.status_code == 201, r.text

    # When the campaign is scheduled and the scheduler fans it out (no worker yet)
    campaign_id = create(stack, cohort, template=f"spring-{cohort}")
    with scheduler_thread(stack.env):
        running = wait_for(lambda: (c := show(stack, campaign_id))["fanned_out_at"] and c)
        assert running["status"] == "running"
        assert running["counts"]["queued"] == len(allowed)
        # And the audience view agrees before anyone is sent anything
        preview = client.get(f"/v1/campaigns/{campaign_id}/audience",
                             headers=auth(keys["marketing"])).json()
        planted = Counter(p.suppressed for p in people if p.suppressed)
        assert preview["eligible"] == len(allowed)
        assert preview["excluded"] == {"no_consent": sum(not p.opted_in for p in people),
                                       **planted}
        assert preview["audience"] == 2000
        # And a few people unsubscribe while their messages are queued
        leavers = allowed[1:6]
        for person in leavers:
            r = client.post(f"/v1/recipients/{person.external_id}/consents",
                            headers=auth(keys["recipients"]),
                            json={"topic": "newsletter", "granted": False,
                                  "source": "api"})
            assert r.status_code == 201, r.text
        # And then a worker starts sending
        worker = WorkerProcess(stack.env, threads=8)
        try:
            done = wait_for(lambda: (c := show(stack, campaign_id))["status"] == "completed"
                            and c, timeout=60, interval=0.2)
        finally:
            worker.stop()

    # Then the sink received exactly the allowed set, once each
    expected = {p.email for p in allowed} - {p.email for p in leavers}
    received = delivered_to(stack)
    assert set(received) == expected
    assert set(received.values()) == {1}
    by_email = {p.email: p for p in people}
    one_click: list[str] = []
    for mail in mails(stack):
        person = by_email[mail["To"].addresses[0].addr_spec]
        # With working one-click headers (RFC 8058) naming this person and topic
        match = UNSUBSCRIBE.match(mail["List-Unsubscribe"])
        assert match, mail["List-Unsubscribe"]
        token = rt.signer.verify(match.group(1).rsplit("/", 1)[1], "u")
        assert (token.recipient_id, token.topic) == (person.id, "newsletter")
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        # And the body from the stored template, the profile and the shared data
        text = mail.get_body(("plain",)).get_content()
        assert f"Hello {person.name} (#{person.n}): Spring news. All about spring." in text
        one_click.append(match.group(1))

    # And the counts add up
    counts = done["counts"]
    assert counts["audience"] == 2000
    assert counts["sent"] == len(expected)
    assert done["suppressed_by_reason"] == {"no_consent": sum(not p.opted_in for p in people),
                                           "unsubscribed": len(leavers), **planted}
    assert counts["suppressed"] == sum(done["suppressed_by_reason"].values())
    assert counts["sent"] + counts["suppressed"] == counts["audience"]
    assert counts["queued"] == counts["held"] == counts["failed"] == counts["pending"] == 0

    # And the one-click POST a mail client makes unsubscribes, and is counted
    for path in one_click[:3]:
        r = client.post(path, content="List-Unsubscribe=One-Click",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, r.text
    assert show(stack, campaign_id)["counts"]["unsubscribed"] == 3


# --- pause, resume, cancel, restart (real worker and Redis) ---------------------------------


def _backlog(stack: Stack) -> str:
    """A paced campaign to 300 that has sent some mail, then piled up unsent mail.

    The relay answers 451 at RCPT for a while (``4xx_rcpt``): messages go ``deferred``
    and the fan-out keeps queueing, and nothing refused was delivered, so nothing can be
    delivered twice later.
    """
    cohort = f"p{uuid.uuid4().hex[:8]}"
    add_people(stack.rt, 300, cohort)
    sentinel_delivered(stack)  # the worker is up
    campaign_id = create(stack, cohort, rate_per_minute=3000)
    wait_for(lambda: sum(campaign_mail(stack).values()) >= 20, timeout=30, interval=0.02)
    stack.recorder.fault = "4xx_rcpt"
    # Waiting in the outbox, not in a worker's hands: what a pause or cancel must catch.
    wait_for(lambda: statuses(stack, campaign_id)["queued"]
             + statuses(stack, campaign_id)["deferred"] >= 50, interval=0.05)
    return campaign_id


def statuses(stack: Stack, campaign_id: str) -> Counter[str]:
    """The campaign's messages by outbox status, read from the database."""
    from sqlalchemy import func, select

    from mailer.store.schema import messages

    with stack.rt.engine.connect() as conn:
        return Counter({status: n for status, n in conn.execute(
            select(messages.c.status, func.count())
            .where(messages.c.campaign_id == campaign_id).group_by(messages.c.status))})


def _settled(stack: Stack, campaign_id: str) -> dict[str, Any]:
    """Once the relay accepts again and the worker drained its queue: the campaign."""
    stack.recorder.fault = None
    sentinel_delivered(stack)
    # Retries due after the pause meet the send-time check and are held or cancelled.
    return dict(wait_for(lambda: (c := show(stack, campaign_id))["counts"]["queued"] == 0
                         and c, interval=0.1))


def test_pause_holds_unsent_mail_and_resume_sends_it_once(stack: Stack) -> None:
    worker = WorkerProcess(stack.env, threads=4)
    try:
        with scheduler_thread(stack.env):
            # Given a paced campaign to 300 that has sent some mail and has more waiting
            campaign_id = _backlog(stack)
            # When it is paused
            r = act(stack, campaign_id, "pause")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "paused"
            # Then its unsent mail is held, and none of it goes out while paused
            paused = _settled(stack, campaign_id)
            assert paused["counts"]["held"] >= 50
            assert sum(campaign_mail(stack).values()) == paused["counts"]["sent"] < 300
            # And the fan-out has stopped too: nothing changes while it stays paused
            sentinel_delivered(stack)
            assert show(stack, campaign_id)["counts"] == paused["counts"]
            # When it is resumed
            r = act(stack, campaign_id, "resume")
            assert r.json()["status"] == "running"
            # Then everyone gets the mail exactly once
            done = wait_for(lambda: (c := show(stack, campaign_id))["status"] == "completed"
                            and c, timeout=40, interval=0.2)
    finally:
        worker.stop()
    received = campaign_mail(stack)
    assert len(received) == 300 and set(received.values()) == {1}
    assert done["counts"]["sent"] == done["counts"]["audience"] == 300
    assert done["counts"]["held"] == done["counts"]["queued"] == 0


def test_cancel_stops_the_campaign_for_good(stack: Stack) -> None:
    worker = WorkerProcess(stack.env, threads=4)
    try:
        with scheduler_thread(stack.env):
            # Given a paced campaign to 300 that has sent some mail and has more waiting
            campaign_id = _backlog(stack)
            # When it is cancelled
            r = act(stack, campaign_id, "cancel")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "cancelled"
            # Then its unsent mail is cancelled and none of it goes out
            final = _settled(stack, campaign_id)
            sentinel_delivered(stack)
            assert show(stack, campaign_id)["counts"] == final["counts"]
    finally:
        worker.stop()
    counts = final["counts"]
    assert counts["cancelled"] >= 50
    assert sum(campaign_mail(stack).values()) == counts["sent"] > 0
    # And the counts add up: sent, cancelled, and never written
    assert counts["sent"] + counts["cancelled"] + counts["pending"] == counts["audience"] == 300
    # And a cancelled campaign cannot be resumed
    r = act(stack, campaign_id, "resume")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "invalid_campaign_state"


def test_restarted_and_second_scheduler_send_nobody_twice(stack: Stack) -> None:
    from sqlalchemy import func, select

    from mailer.store.schema import messages

    cohort = f"r{uuid.uuid4().hex[:8]}"
    add_people(stack.rt, 600, cohort)
    # Given two schedulers running at once, and a paced campaign of 600
    worker = WorkerProcess(stack.env, threads=4)
    sentinel_delivered(stack)
    first, second = scheduler_process(stack.env), scheduler_process(stack.env)
    third: subprocess.Popen[bytes] | None = None
    try:
        campaign_id = create(stack, cohort, rate_per_minute=6000)
        # When the first is SIGKILLed in the middle of the fan-out
        wait_for(lambda: 100 <= 600 - show(stack, campaign_id)["counts"]["pending"] < 600,
                 timeout=30, interval=0.02)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert show(stack, campaign_id)["counts"]["pending"] > 0
        # And a replacement starts
        third = scheduler_process(stack.env)
        done = wait_for(lambda: (c := show(stack, campaign_id))["status"] == "completed" and c,
                        timeout=40, interval=0.2)
    finally:
        worker.stop()
        for proc in (second, third):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
    # Then every person got exactly one mail and one message row
    received = campaign_mail(stack)
    assert len(received) == 600 and set(received.values()) == {1}
    assert done["counts"]["sent"] == done["counts"]["audience"] == 600
    with stack.rt.engine.connect() as conn:
        rows = conn.execute(select(func.count(), func.count(func.distinct(messages.c.to_hash)))
                            .where(messages.c.campaign_id == campaign_id)).one()
    assert tuple(rows) == (600, 600)


# --- the state machine and fan-out, without Redis -----------------------------------------


def test_a_campaign_starts_once_however_many_schedulers_tick(local: Stack) -> None:
    from sqlalchemy import select

    from mailer.campaigns.tick import TickReport, tick
    from mailer.config import Settings
    from mailer.runtime import Runtime
    from mailer.sending.queue import ListEnqueuer
    from mailer.store.schema import messages

    cohort = f"t{uuid.uuid4().hex[:8]}"
    add_people(local.rt, 1200, cohort, opted_in=lambda n: n % 2 == 0)
    campaign_id = create(local, cohort)
    # Given two schedulers, each with its own connection pool and queue
    runtimes = [Runtime.from_settings(Settings.from_environ(local.env), ListEnqueuer())
                for _ in range(2)]
    reports: list[list[TickReport]] = [[], []]
    gate = threading.Barrier(2)

    def run(i: int) -> None:
        gate.wait()
        for _ in range(100):
            reports[i].append(tick(runtimes[i], batch=100))
            if fanned_out(runtimes[i], campaign_id):
                return

    # When both tick at the same time until the fan-out is done
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # Then exactly one of them started it
    starts = [campaign_id in r.started for rs in reports for r in rs]
    assert starts.count(True) == 1
    # And each address has one message, and each queued id was enqueued once
    with local.rt.engine.connect() as conn:
        rows = conn.execute(select(messages.c.id, messages.c.to_hash, messages.c.status)
                            .where(messages.c.campaign_id == campaign_id)).all()
    assert len(rows) == len({r.to_hash for r in rows}) == 1200
    enqueued = [i for rt in runtimes for ids, _ in rt.enqueuer.batches for i in ids]
    assert sorted(enqueued) == sorted(r.id for r in rows if r.status == "queued")
    assert len(enqueued) == 600
    for rt in runtimes:
        rt.engine.dispose()


def fanned_out(rt: Any, campaign_id: str) -> bool:
    from mailer.campaigns import lifecycle as campaigns

    with rt.engine.connect() as conn:
        return campaigns.get(conn, campaign_id).fanned_out_at is not None


def test_late_campaign_waits_for_an_explicit_resume(local: Stack) -> None:
    from mailer.campaigns.tick import tick

    cohort = f"l{uuid.uuid4().hex[:8]}"
    add_people(local.rt, 10, cohort)
    # Given a campaign whose send_at is two hours past when the scheduler first sees it
    past = (local.rt.clock() - timedelta(hours=2)).isoformat()
    campaign_id = create(local, cohort, send_at=past)
    # When the scheduler ticks
    report = tick(local.rt)
    # Then it is not sent but marked late and paused
    assert report.late == [campaign_id] and report.started == []
    late = show(local, campaign_id)
    assert (late["status"], late["late"], late["counts"]["audience"]) == ("paused", True, 0)
    assert tick(local.rt).started == []
    # When someone resumes it explicitly, Then the next tick starts and fans it out
    assert act(local, campaign_id, "resume").json()["status"] == "scheduled"
    assert tick(local.rt).started == [campaign_id]
    running = show(local, campaign_id)
    assert running["status"] == "running" and running["counts"]["queued"] == 10


def test_rate_per_minute_paces_the_batches(local: Stack) -> None:
    from mailer.campaigns.fanout import fan_out_batch
    from mailer.campaigns.tick import start_due

    cohort = f"q{uuid.uuid4().hex[:8]}"
    add_people(local.rt, 5, cohort)
    now = local.rt.clock()
    local.rt.clock = lambda: now
    campaign_id = create(local, cohort, rate_per_minute=120)
    assert start_due(local.rt)[0] == [campaign_id]
    # Given 120 per minute: batches of 2, one second apart
    first = fan_out_batch(local.rt, campaign_id)
    assert (first.written, first.queued) == (2, 2)
    # When the next batch is asked for at the same moment, Then it waits one second
    waiting = fan_out_batch(local.rt, campaign_id)
    assert waiting.written == 0 and waiting.waiting_until == now + timedelta(seconds=1)
    # And a second later it writes the next two
    local.rt.clock = lambda: now + timedelta(seconds=1)
    assert fan_out_batch(local.rt, campaign_id).written == 2


def test_pause_holds_queued_mail_and_resume_releases_it(local: Stack) -> None:
    from mailer.campaigns.tick import tick
    from mailer.store.outbox import claim

    cohort = f"h{uuid.uuid4().hex[:8]}"
    add_people(local.rt, 50, cohort)
    campaign_id = create(local, cohort)
    tick(local.rt)
    ids = [i for batch, _ in local.rt.enqueuer.batches for i in batch]
    assert len(ids) == 50
    # When the campaign is paused, Then its queued mail is held and no worker can claim it
    assert act(local, campaign_id, "pause").json()["counts"]["held"] == 50
    with local.rt.engine.begin() as conn:
        assert claim(conn, ids, local.rt.clock(), timedelta(minutes=1)) == []
    # When it is resumed, Then the same messages are queued and enqueued again
    local.rt.enqueuer.batches.clear()
    resumed = act(local, campaign_id, "resume").json()
    assert resumed["counts"]["queued"] == 50 and resumed["counts"]["held"] == 0
    assert sorted(i for batch, _ in local.rt.enqueuer.batches for i in batch) == sorted(ids)
    # And pausing twice is harmless, while a cancelled campaign cannot be paused
    assert act(local, campaign_id, "cancel").json()["counts"]["cancelled"] == 50
    r = act(local, campaign_id, "pause")
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_campaign_state"


def test_audience_filter_is_typed_equality(local: Stack) -> None:
    from sqlalchemy import insert

    from mailer.campaigns.audience import AudienceFilter, audience_count
    from mailer.store.schema import recipients

    cohort = f"f{uuid.uuid4().hex[:8]}"
    values: list[Any] = ["pro", "Pro", ["pro"], 1, "1", True, 1.0, None, {"x": 1}]
    now = local.rt.clock()
    with local.rt.engine.begin() as conn:
        conn.execute(insert(recipients), [{
            "external_id": f"{cohort}-{i}", "email": f"{cohort}-{i}@example.org",
            "email_hash": local.rt.hash_email(f"{cohort}-{i}@example.org"),
            "attributes": {"cohort": cohort, "v": v}, "account_active": True,
            "created_at": now, "updated_at": now} for i, v in enumerate(values)])
    cases = [("pro", 1), (1, 2), (True, 1), ("1", 1), (None, 1), ("nope", 0)]
    for want, expected in cases:
        flt = AudienceFilter.parse({"attributes": {"cohort": cohort, "v": want}})
        # The SQL filter of this database ...
        with local.rt.engine.connect() as conn:
            assert audience_count(conn, flt, 10**9) == expected, want
        # ... agrees with the Python one used where JSON functions are missing
        assert sum(flt.matches({"cohort": cohort, "v": v}) for v in values) == expected, want


def test_audience_view_counts_each_address_once_by_reason(local: Stack) -> None:
    from sqlalchemy import insert

    from mailer.store.schema import recipients

    cohort = f"a{uuid.uuid4().hex[:8]}"
    reasons = {1: HARD, 2: COMPLAINT}
    people = add_people(local.rt, 30, cohort, opted_in=lambda n: n % 3 != 0,
                        suppressed=lambda n: reasons.get(n % 10))
    # Given a second profile sharing an address (lower id wins: the first one's state)
    now = local.rt.clock()
    with local.rt.engine.begin() as conn:
        conn.execute(insert(recipients).values(
            external_id=f"{cohort}-twin", email=people[0].email,
            email_hash=local.rt.hash_email(people[0].email), account_active=True,
            attributes={"cohort": cohort}, created_at=now, updated_at=now))
    campaign_id = create(local, cohort)
    # When marketing asks before sending
    r = local.client.get(f"/v1/campaigns/{campaign_id}/audience",
                         headers=auth(local.keys["marketing"]))
    assert r.status_code == 200, r.text
    # Then every address is counted once, eligible or excluded with its reason
    planted = Counter(p.suppressed for p in people if p.suppressed)
    expected_excluded = {"no_consent": sum(not p.opted_in for p in people), **planted}
    assert r.json()["excluded"] == expected_excluded
    assert r.json()["eligible"] == 30 - sum(expected_excluded.values())
    assert r.json()["audience"] == 30


@pytest.mark.parametrize(("change", "status", "code"), [
    ({"template": "no_such_template"}, 422, "unknown_template"),
    ({"template": "registration_confirmation"}, 422, "not_a_promotion"),
    ({"topic": "product_updates"}, 422, "topic_mismatch"),
    ({"data": {"headline": "H"}}, 422, "missing_variable"),
    ({"audience": {"attributes": {"plan": {"$ne": 1}}}}, 422, "invalid_audience"),
    ({"audience": {"where": "1=1"}}, 422, "invalid_audience"),
    ({"send_at": "2030-01-01T09:00:00"}, 422, "validation_error"),
    ({"rate_per_minute": 0}, 422, "validation_error"),
])
def test_bad_campaigns_are_refused(local: Stack, change: dict[str, Any], status: int,
                                   code: str) -> None:
    body = {"name": "x", "template": "newsletter", "topic": "newsletter",
            "data": {"headline": "H", "body": "B"}, **change}
    r = local.client.post("/v1/campaigns", json=body, headers=auth(local.keys["marketing"]))
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_campaigns_need_the_marketing_scope(local: Stack) -> None:
    body = {"name": "x", "template": "newsletter", "topic": "newsletter",
            "data": {"headline": "H", "body": "B"}}
    r = local.client.post("/v1/campaigns", json=body, headers=auth(local.keys["transactional"]))
    assert r.status_code == 403
    assert local.client.get("/v1/campaigns").status_code == 401
    # And the list shows what a marketing key created
    created = local.client.post("/v1/campaigns", json=body,
                                headers=auth(local.keys["marketing"])).json()["id"]
    listed = local.client.get("/v1/campaigns", headers=auth(local.keys["marketing"])).json()
    assert [c["id"] for c in listed["campaigns"]] == [created]
    assert listed["campaigns"][0]["counts"]["audience"] == 0
