"""End to end through a real Postfix relay: default EHLO name, STARTTLS, SMTP AUTH (SPEC 5, 6).

The worker runs as a real ``dramatiq workers.actors`` process with the configuration a
user would write: no ``MAILER_SMTP_HELO_NAME`` (this machine's FQDN is ``localhost``,
which Postfix refuses, so the From domain must be used), STARTTLS trusting a private CA
given by ``MAILER_SMTP_CA_FILE``. A relay that refuses our credentials leaves mail
``deferred``/``relay_error``, never failed or suppressed, and it goes out once fixed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from typing import Any

from tests.conftest import ROOT, WorkerProcess, auth, base_env, unique_email, wait_for
from tests.relays import PostfixRelay, running_postfix
from tests.services import RedisServer


def _accept(env: dict[str, str], count: int, tag: str) -> tuple[Any, list[str]]:
    """Accept ``count`` registration confirmations through the real API; return runtime, ids."""
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.keys import create_key
    from mailer.runtime import Runtime

    rt = Runtime.from_settings(Settings.from_environ(env))
    with rt.engine.begin() as conn:
        key = create_key(conn, f"relay-{tag}", ["messages:transactional"])
    batch = [{"template": "registration_confirmation", "to": unique_email(tag),
              "data": {"name": "R", "confirm_url": "https://example.test/c"}}
             for _ in range(count)]
    with TestClient(create_app(rt)) as client:
        response = client.post("/v1/messages/batch", json={"messages": batch},
                               headers=auth(key))
        assert response.status_code == 202, response.text
    return rt, [r["id"] for r in response.json()["results"]]


def _rows(rt: Any, ids: list[str]) -> list[Any]:
    from sqlalchemy import select

    from mailer.store.schema import messages

    with rt.engine.connect() as conn:
        return list(conn.execute(
            select(messages.c.id, messages.c.status, messages.c.reason, messages.c.smtp_code,
                   messages.c.smtp_response, messages.c.to_hash, messages.c.message_id_header)
            .where(messages.c.id.in_(ids))))


def _statuses(rt: Any, ids: list[str]) -> Counter[str]:
    return Counter(str(r.status) for r in _rows(rt, ids))


def _relay_env(
    db_url: str, redis: RedisServer, relay: PostfixRelay, **extra: str
) -> dict[str, str]:
    env = base_env(db_url, redis.url, relay.port, MAILER_SMTP_SECURITY="starttls",
                   MAILER_SMTP_CA_FILE=str(relay.ca_file), **extra)
    env.pop("MAILER_SMTP_HELO_NAME", None)  # the default, as a user would leave it
    return env


def test_default_configuration_delivers_through_postfix_over_starttls(
    db_url: str, redis: RedisServer
) -> None:
    # Given a machine whose FQDN is not usable in EHLO, and a Postfix that refuses a
    # non-FQDN EHLO and offers STARTTLS with a certificate from a private CA
    assert "." not in socket.getfqdn() or socket.getfqdn().startswith("localhost")
    with running_postfix(tls=True) as relay:
        env = _relay_env(db_url, redis, relay)
        rt, ids = _accept(env, 20, "pfx")
        # When a worker with the default EHLO name and the CA file sends them
        worker = WorkerProcess(env, threads=2)
        try:
            wait_for(lambda: _statuses(rt, ids) == Counter({"sent": 20}), timeout=60)
        finally:
            worker.stop()
        # Then Postfix accepted every one and relayed it on, received over TLS from the
        # From domain's name (example.test), never "localhost"
        expected = {r.message_id_header.encode() for r in _rows(rt, ids)}
        delivered = relay.wait_delivered(20)
        mine = [m for m in delivered if any(mid in m.data for mid in expected)]
        assert len(mine) == 20
        assert all(b"from example.test" in m.data and b"with ESMTPS" in m.data for m in mine)
        assert "Helo command rejected" not in relay.log_text()


def test_wrong_credentials_defer_as_relay_error_and_fixed_ones_deliver(
    db_url: str, redis: RedisServer
) -> None:
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from mailer.api.app import create_app
    from mailer.store.schema import suppressions

    # Given a Postfix that requires STARTTLS and SMTP AUTH, and 10 accepted messages
    with running_postfix(require_tls=True, auth=True) as relay:
        good = _relay_env(db_url, redis, relay, MAILER_SMTP_USERNAME=relay.username,
                          MAILER_SMTP_PASSWORD=relay.password)
        bad = {**good, "MAILER_SMTP_PASSWORD": relay.password + "-wrong"}
        rt, ids = _accept(good, 10, "auth")
        # When a worker with a wrong password tries to send them
        worker = WorkerProcess(bad, threads=2)
        try:
            def all_relay_errors() -> bool:
                rows = _rows(rt, ids)
                return all(r.status == "deferred" and r.reason == "relay_error" for r in rows)

            wait_for(all_relay_errors, timeout=60)
        finally:
            worker.stop()
        # Then each stays deferred with reason relay_error and the relay's 535 kept; none
        # failed, none suppressed, nothing delivered
        rows = _rows(rt, ids)
        assert {(r.smtp_code, r.smtp_response[:5]) for r in rows} == {(535, "5.7.8")}
        with rt.engine.connect() as conn:
            hashes = {r.to_hash for r in rows}
            assert not list(conn.execute(
                select(suppressions.c.id).where(suppressions.c.email_hash.in_(hashes))))
        assert relay.delivered == []
        # And /metrics counts the relay errors, and the worker logged the refusal once,
        # without any address
        with TestClient(create_app(rt)) as client:
            metrics = client.get("/metrics").text
        [line] = [x for x in metrics.splitlines() if x.startswith("mailer_relay_errors_total")]
        assert float(line.split()[-1]) >= 10
        log = worker.log_text()
        assert log.count("refused us") == 1, log
        assert "@" not in "".join(x for x in log.splitlines() if "refused us" in x)

        # When the worker is restarted with the right password (and the sweeper runs)
        fixed = WorkerProcess(good, threads=2)
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "workers.scheduler"], cwd=ROOT,
            env={**os.environ, **good, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: _statuses(rt, ids) == Counter({"sent": 10}), timeout=90)
        finally:
            fixed.stop()
            scheduler.terminate()
            scheduler.wait(timeout=10)
        # Then every message goes out, none lost, each once
        delivered = relay.wait_delivered(10)
        expected = {r.message_id_header.encode() for r in _rows(rt, ids)}
        assert sum(1 for m in delivered if any(mid in m.data for mid in expected)) == 10
