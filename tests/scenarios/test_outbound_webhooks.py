"""Outbound event webhooks end to end (SPEC 13): API -> worker -> SMTP -> outbox -> scheduler
-> a caller's real HTTP receiver, verified with ``mailer.client.verify_webhook``.

The module runs its own Redis, SMTP server, worker and scheduler, with
``MAILER_WEBHOOK_ALLOW_PRIVATE=true`` (the receiver is on loopback), so that it can stop,
kill and restart them without touching the session's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from mailer.client import verify_webhook
from tests.conftest import (
    ROOT,
    WorkerProcess,
    auth,
    base_env,
    serving,
    unique_email,
    wait_for,
)
from tests.events.receiver import Answer, Hit, Receiver, running_receiver
from tests.scenarios.test_bounce_flow import dsn_report, post_dsn
from tests.scenarios.test_unsubscribe import path_of, subscribed_person, unsubscribe_url
from tests.services import RedisServer, redis_server_available, require

pytestmark = pytest.mark.db

#: How long to keep watching for a duplicate after the expected request arrived.
QUIET = 3.0


class SchedulerProcess:
    """``python -m workers.scheduler`` in its own process group, stopped by PID."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="mailer-scheduler-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    def start(self) -> None:
        """Start it (once at a time)."""
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.scheduler"], cwd=ROOT, env=self.env,
                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@dataclass
class Stack:
    """The module's API client, runtime, keys, processes, SMTP recorder and receiver."""

    client: Any
    runtime: Any
    env: dict[str, str]
    keys: dict[str, str]
    worker: WorkerProcess
    scheduler: SchedulerProcess
    smtp: Any
    receiver: Receiver

    def register(self, path: str, events: list[str] | None = None) -> dict[str, Any]:
        """Register the receiver's ``path`` through the API; return the 201 body."""
        body: dict[str, Any] = {"url": self.receiver.url(path)}
        if events is not None:
            body["events"] = events
        r = self.client.post("/v1/webhook-endpoints", json=body,
                             headers=auth(self.keys["admin"]))
        assert r.status_code == 201, r.text
        return dict(r.json())

    def unregister(self, endpoint_id: str) -> None:
        """DELETE the endpoint (the shared database must not fan out to it later)."""
        self.client.delete(f"/v1/webhook-endpoints/{endpoint_id}",
                           headers=auth(self.keys["admin"]))

    def endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """GET /v1/webhook-endpoints/{id}."""
        r = self.client.get(f"/v1/webhook-endpoints/{endpoint_id}",
                            headers=auth(self.keys["admin"]))
        assert r.status_code == 200, r.text
        return dict(r.json())

    def send(self, key: str, **body: Any) -> dict[str, Any]:
        """POST /v1/messages; the 202 body."""
        r = self.client.post("/v1/messages", json=body, headers=auth(self.keys[key]))
        assert r.status_code == 202, r.text
        return dict(r.json())

    def message(self, key: str, message_id: str) -> dict[str, Any]:
        """GET /v1/messages/{id}."""
        return dict(self.client.get(f"/v1/messages/{message_id}",
                                    headers=auth(self.keys[key])).json())

    def wait_status(self, key: str, message_id: str, status: str) -> dict[str, Any]:
        """Wait until the message has ``status``; return it."""
        return dict(wait_for(lambda: (m := self.message(key, message_id))["status"] == status
                             and m, timeout=30))


def about(receiver: Receiver, path: str, field: str,
          value: str) -> list[tuple[Hit, dict[str, Any]]]:
    """The requests to ``path`` whose body's ``data[field]`` is ``value``, with the body."""
    found = []
    for hit in receiver.hits(path):
        body = json.loads(hit.body)
        if body["data"].get(field) == value:
            found.append((hit, body))
    return found


@pytest.fixture(scope="module")
def stack(db_url: str) -> Iterator[Stack]:
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.keys import create_key
    from mailer.runtime import Runtime
    from tests.smtp_servers import running_smtp_server

    require("redis-server", redis_server_available(), "redis-server is not installed")
    with RedisServer() as redis, running_smtp_server() as (_, port, smtp), \
            running_receiver() as receiver:
        smtp.port = port
        env = base_env(db_url, redis.url, port, MAILER_WEBHOOK_ALLOW_PRIVATE="true",
                       MAILER_WEBHOOK_RETRY_BASE="1s")
        rt = Runtime.from_settings(Settings.from_environ(env))
        scopes = {"admin": ["admin"], "transactional": ["messages:transactional"],
                  "marketing": ["marketing"], "recipients": ["recipients"]}
        with rt.engine.begin() as conn:
            keys = {name: create_key(conn, f"hooks-{name}", s) for name, s in scopes.items()}
        with TestClient(create_app(rt)) as client:
            stack = Stack(client, rt, env, keys, WorkerProcess(env), SchedulerProcess(env),
                          smtp, receiver)
            stack.scheduler.start()
            try:
                yield stack
            finally:
                stack.scheduler.stop()
                # The test that kills the worker replaces it: stop whichever is current.
                stack.worker.stop()


@pytest.fixture()
def hooks(stack: Stack) -> Iterator[Stack]:
    """The stack; endpoints registered during the test are deleted after it."""
    r = stack.client.get("/v1/webhook-endpoints", headers=auth(stack.keys["admin"]))
    before = {e["id"] for e in r.json()["items"]}
    yield stack
    r = stack.client.get("/v1/webhook-endpoints", headers=auth(stack.keys["admin"]))
    for item in r.json()["items"]:
        if item["id"] not in before:
            stack.unregister(item["id"])


def registration(client: Any, key: str, **body: Any) -> Any:
    return client.post("/v1/webhook-endpoints", json=body, headers=auth(key))


# --- the API -----------------------------------------------------------------------------


def test_a_loopback_target_is_422_without_the_allow_flag(client: Any,
                                                         keys: dict[str, str]) -> None:
    # Given the session's app, configured without MAILER_WEBHOOK_ALLOW_PRIVATE
    for url in ("http://127.0.0.1/hooks", "http://127.0.0.1:8080/hooks", "http://[::1]/h",
                "http://localhost/hooks", "http://169.254.169.254/latest/meta-data/",
                "http://10.1.2.3/hooks", "http://[::ffff:127.0.0.1]/hooks"):
        # When an admin registers it
        r = registration(client, keys["admin"], url=url)
        # Then it is 422 with the error body, and nothing is stored
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"]["code"] == "webhook_target_refused"
    listed = client.get("/v1/webhook-endpoints", headers=auth(keys["admin"])).json()["items"]
    assert not [e for e in listed if "127.0.0.1" in e["url"] or "localhost" in e["url"]]


def test_registration_shows_the_secret_once_and_deletion_is_final(hooks: Stack) -> None:
    client, admin = hooks.client, hooks.keys["admin"]
    # When an endpoint is registered for two types
    r = registration(client, admin, url=hooks.receiver.url("/api"),
                     events=["message.bounced", "message.sent", "message.sent"],
                     description="billing service")
    # Then 201 gives the id, url, types (in SPEC order, once each) and the secret
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["events"] == ["message.sent", "message.bounced"]
    assert created["secret"].startswith("whsec_")
    # And the secret is never shown again, nor stored in clear
    shown = client.get(f"/v1/webhook-endpoints/{created['id']}", headers=auth(admin))
    assert shown.status_code == 200
    assert "secret" not in shown.json()
    assert (shown.json()["failing_since"], shown.json()["last_error"]) == (None, None)
    listed = client.get("/v1/webhook-endpoints", headers=auth(admin)).json()
    assert created["id"] in [e["id"] for e in listed["items"]]
    assert created["secret"] not in json.dumps(listed)
    from mailer.store.schema import webhook_endpoints
    with hooks.runtime.engine.connect() as conn:
        stored = conn.execute(select(webhook_endpoints.c.secret).where(
            webhook_endpoints.c.id == created["id"])).scalar_one()
    assert created["secret"].removeprefix("whsec_") not in stored
    # And without "events" an endpoint gets every type
    every = registration(client, admin, url=hooks.receiver.url("/all")).json()
    assert "recipient.unsubscribed" in every["events"] and len(every["events"]) == 9
    # When it is deleted, Then 204, and it is gone
    assert client.delete(f"/v1/webhook-endpoints/{created['id']}",
                         headers=auth(admin)).status_code == 204
    assert client.get(f"/v1/webhook-endpoints/{created['id']}",
                      headers=auth(admin)).status_code == 404
    assert client.delete(f"/v1/webhook-endpoints/{created['id']}",
                         headers=auth(admin)).status_code == 404


def test_registration_refuses_bad_input_and_non_admins(hooks: Stack) -> None:
    client, admin = hooks.client, hooks.keys["admin"]
    url = hooks.receiver.url("/x")
    cases = [
        ({"url": url, "events": ["message.opened"]}, 422, "unknown_event_type"),
        ({"url": url, "events": []}, 422, "unknown_event_type"),
        ({"url": "ftp://example.com/x"}, 422, "webhook_target_refused"),
        ({"url": "https://u:p@example.com/x"}, 422, "webhook_target_refused"),
        ({"url": url, "secret": "mine"}, 422, "validation_error"),
    ]
    for body, status, code in cases:
        r = registration(client, admin, **body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    assert registration(client, hooks.keys["transactional"], url=url).status_code == 403
    assert client.get("/v1/webhook-endpoints").status_code == 401


# --- events through the real worker and scheduler -------------------------------------------


def test_a_sent_message_produces_exactly_one_signed_message_sent(hooks: Stack) -> None:
    # Given an endpoint for sent and suppressed messages
    endpoint = hooks.register("/sent", ["message.sent", "message.suppressed"])
    # When a message is sent through the worker and the SMTP server
    accepted = hooks.send("transactional", template="registration_confirmation",
                          to=unique_email("hook"),
                          data={"name": "Ada", "confirm_url": "https://example.test/c"})
    hooks.wait_status("transactional", accepted["id"], "sent")
    # Then the receiver gets its message.sent
    wait_for(lambda: about(hooks.receiver, "/sent", "message_id", accepted["id"]), timeout=30)
    time.sleep(QUIET)
    found = about(hooks.receiver, "/sent", "message_id", accepted["id"])
    # Exactly once, under one event id, signed with the endpoint's secret
    assert len(found) == 1
    hit, _ = found[0]
    body = verify_webhook(endpoint["secret"], hit.headers, hit.body)
    assert body["type"] == "message.sent"
    data = body["data"]
    assert (data["status"], data["category"], data["template"], data["smtp_code"]) == (
        "sent", "registration_confirmation", "registration_confirmation", 250)
    assert data["reason"] is None and data["campaign_id"] is None
    assert hit.headers["webhook-id"].startswith("msg_")


def test_a_message_suppressed_at_acceptance_emits_message_suppressed(hooks: Stack) -> None:
    endpoint = hooks.register("/suppressed", ["message.suppressed"])
    # When a service alert goes to an address without an account
    accepted = hooks.send("transactional", template="service_alert", to=unique_email("noacc"),
                          data={"name": "A", "title": "T", "body": "B"})
    assert (accepted["status"], accepted["reason"]) == ("suppressed", "no_account")
    # Then the receiver hears of it, with the reason
    [(hit, body)] = wait_for(
        lambda: about(hooks.receiver, "/suppressed", "message_id", accepted["id"]), timeout=30)
    verify_webhook(endpoint["secret"], hit.headers, hit.body)
    assert body["type"] == "message.suppressed"
    assert (body["data"]["status"], body["data"]["reason"]) == ("suppressed", "no_account")


def test_a_failed_delivery_comes_again_with_the_same_id_and_then_no_more(hooks: Stack) -> None:
    # Given a receiver that answers its first request with 500
    hooks.receiver.plan("/flaky", Answer(500))
    endpoint = hooks.register("/flaky", ["message.sent"])
    # When a message is sent
    accepted = hooks.send("transactional", template="registration_confirmation",
                          to=unique_email("flaky"),
                          data={"name": "Ada", "confirm_url": "https://example.test/c"})
    # Then the event comes twice: refused, then retried after the endpoint's backoff
    wait_for(lambda: len(about(hooks.receiver, "/flaky", "message_id", accepted["id"])) >= 2,
             timeout=30)
    time.sleep(QUIET)
    found = about(hooks.receiver, "/flaky", "message_id", accepted["id"])
    assert len(found) == 2
    (first, _), (second, _) = found
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    verify_webhook(endpoint["secret"], second.headers, second.body)
    # And the endpoint is healthy again, with the error it had kept
    view = hooks.endpoint(endpoint["id"])
    assert view["failing_since"] is None and view["last_error"] == "HTTP 500"


def test_a_redirecting_receiver_is_not_followed(hooks: Stack) -> None:
    # Given a receiver that redirects every request to another path
    target = hooks.receiver.url("/redirect-target")
    hooks.receiver.plan("/redirect", *[Answer(307, location=target)] * 20)
    endpoint = hooks.register("/redirect", ["message.suppressed"])
    accepted = hooks.send("transactional", template="service_alert", to=unique_email("redir"),
                          data={"name": "A", "title": "T", "body": "B"})
    # When the event is delivered (and retried)
    wait_for(lambda: len(about(hooks.receiver, "/redirect", "message_id",
                               accepted["id"])) >= 2, timeout=30)
    # Then the other path never got it, and the endpoint says why it is failing
    assert hooks.receiver.hits("/redirect-target") == []
    view = hooks.endpoint(endpoint["id"])
    assert view["failing_since"] is not None
    assert view["last_error"] == "HTTP 307: redirects are not followed"


def test_a_worker_killed_after_the_state_change_loses_no_event(hooks: Stack) -> None:
    from mailer.store.schema import outbound_deliveries, outbound_events

    # Given no scheduler running (nothing is delivered) and an endpoint for sent messages
    hooks.scheduler.stop()
    try:
        endpoint = hooks.register("/killed", ["message.sent"])
        accepted = hooks.send("transactional", template="registration_confirmation",
                              to=unique_email("killed"),
                              data={"name": "Ada", "confirm_url": "https://example.test/c"})
        # When the worker has recorded "sent" and is then SIGKILLed
        hooks.wait_status("transactional", accepted["id"], "sent")
        hooks.worker.kill()
        # Then the event is in the outbox, pending, and nobody has been told yet
        with hooks.runtime.engine.connect() as conn:
            states = conn.execute(
                select(outbound_deliveries.c.state)
                .join(outbound_events, outbound_events.c.id == outbound_deliveries.c.event_id)
                .where(outbound_events.c.message_id == accepted["id"],
                       outbound_deliveries.c.endpoint_id == endpoint["id"])).scalars().all()
        assert states == ["pending"]
        assert about(hooks.receiver, "/killed", "message_id", accepted["id"]) == []
    finally:
        # When the scheduler comes back (and a new worker, for the tests after this one)
        hooks.worker = WorkerProcess(hooks.env)
        hooks.scheduler.start()
    # Then it delivers the event, once
    wait_for(lambda: about(hooks.receiver, "/killed", "message_id", accepted["id"]),
             timeout=30)
    time.sleep(QUIET)
    [(hit, body)] = about(hooks.receiver, "/killed", "message_id", accepted["id"])
    verify_webhook(endpoint["secret"], hit.headers, hit.body)
    assert body["type"] == "message.sent"


def test_a_bounce_report_produces_message_bounced(hooks: Stack) -> None:
    endpoint = hooks.register("/bounced", ["message.bounced"])
    # Given a message that was sent
    address = unique_email("bounce")
    accepted = hooks.send("transactional", template="registration_confirmation", to=address,
                          data={"name": "Ada", "confirm_url": "https://example.test/c"})
    final = hooks.wait_status("transactional", accepted["id"], "sent")
    # When a hard-bounce report for it arrives at /webhooks/dsn
    r = post_dsn(hooks.client, dsn_report(address, final["message_id"]))
    assert r.status_code == 200, r.text
    # Then the receiver gets message.bounced, with the reply code of the report
    [(hit, body)] = wait_for(
        lambda: about(hooks.receiver, "/bounced", "message_id", accepted["id"]), timeout=30)
    verify_webhook(endpoint["secret"], hit.headers, hit.body)
    data = body["data"]
    assert (body["type"], data["status"], data["reason"], data["smtp_code"]) == (
        "message.bounced", "bounced", "hard_bounce", 550)
    assert data["to"] == address


def test_a_one_click_unsubscribe_produces_recipient_unsubscribed(hooks: Stack) -> None:
    endpoint = hooks.register("/unsub", ["recipient.unsubscribed"])
    # Given a person who opted in and received a newsletter
    address, external_id, mail = subscribed_person(hooks.client, hooks.keys, hooks.smtp,
                                                   "hookunsub")
    # When their mail client posts the RFC 8058 one-click unsubscribe
    r = hooks.client.post(path_of(unsubscribe_url(mail)), content=b"List-Unsubscribe=One-Click",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    # Then the service hears of it: who, which topic, how
    [(hit, body)] = wait_for(
        lambda: about(hooks.receiver, "/unsub", "recipient_external_id", external_id),
        timeout=30)
    verify_webhook(endpoint["secret"], hit.headers, hit.body)
    assert body["type"] == "recipient.unsubscribed"
    assert body["data"] == {"recipient_external_id": external_id, "email": address,
                            "topics": ["newsletter"], "all_marketing": False,
                            "source": "one_click"}


def delivery_counts(client: Any) -> dict[str, float]:
    """``mailer_webhook_deliveries_total`` by result, from a /metrics scrape."""
    r = client.get("/metrics")
    assert r.status_code == 200
    lines = [line for line in r.text.splitlines()
             if line.startswith("mailer_webhook_deliveries_total{")]
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in lines}


def test_metrics_count_deliveries_by_result(hooks: Stack) -> None:
    # Given the counts so far, every result present
    before = delivery_counts(hooks.client)
    assert set(before) == {"delivered", "failed", "refused", "dead"}
    # When one more event is delivered
    hooks.register("/counted", ["message.suppressed"])
    accepted = hooks.send("transactional", template="service_alert", to=unique_email("count"),
                          data={"name": "A", "title": "T", "body": "B"})
    wait_for(lambda: about(hooks.receiver, "/counted", "message_id", accepted["id"]),
             timeout=30)
    # Then the scrape counts it (read from the database, whichever process delivered it)
    assert wait_for(lambda: delivery_counts(hooks.client)["delivered"]
                    >= before["delivered"] + 1, timeout=10)


# --- a caller's service, written with mailer.client ----------------------------------------


def test_a_callers_service_sends_reads_status_and_verifies_events_with_the_client(
    hooks: Stack,
) -> None:
    from mailer.client import Client

    # Given a caller's service that registered its receiver for what happens to its mail
    endpoint = hooks.register("/caller", ["message.sent", "message.suppressed"])
    with serving(hooks.runtime) as base_url, \
            Client(base_url, hooks.keys["transactional"]) as mailer:
        # When it sends through mailer.client
        accepted = mailer.send("registration_confirmation", unique_email("caller"),
                               {"name": "Ada", "confirm_url": "https://example.test/c"})
        assert accepted["status"] == "queued"
        # Then it can read the message's status until it is sent
        sent = wait_for(lambda: (m := mailer.get_message(accepted["id"]))["status"] == "sent"
                        and m, timeout=30)
        assert sent["smtp_response"]
    # And its receiver gets one event for it, which the client verifies with the secret
    [(hit, _)] = wait_for(
        lambda: about(hooks.receiver, "/caller", "message_id", accepted["id"]), timeout=30)
    event = Client.verify_webhook(endpoint["secret"], hit.headers, hit.body)
    assert (event["type"], event["data"]["status"]) == ("message.sent", "sent")
    # And a forged copy (same headers, altered body) is refused by the same helper
    from mailer.client import WebhookVerificationError

    with pytest.raises(WebhookVerificationError):
        Client.verify_webhook(endpoint["secret"], hit.headers, hit.body.replace(b"sent", b"sant"))
