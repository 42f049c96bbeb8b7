"""A world with the inbound domain configured: API, its own worker and queue, the listener.

The worker and the API of these tests use their own Redis database, so the session's
worker (started without ``MAILER_INBOUND_DOMAIN``) never sends their mail: every message
here goes out with a VERP envelope sender.
"""

from __future__ import annotations

import email
import re
import smtplib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email import policy
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.conftest import WorkerProcess, auth, unique_email
from tests.scenarios.test_send_path import register, send, wait_final
from tests.services import free_port

#: The inbound domain of these tests.
DOMAIN = "in.example.test"
CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "bounces"


@dataclass
class World:
    """The API client, runtime, listener address and where postmaster@ mail is kept."""

    client: Any
    runtime: Any
    env: dict[str, str]
    host: str
    port: int
    postmaster_dir: Path


@dataclass(frozen=True)
class Sent:
    """A message we really sent, as the relay received it."""

    row_id: str
    message_id: str
    email: str
    external_id: str
    mail_from: str
    data: bytes

    @property
    def headers(self) -> Any:
        """The parsed headers of the message as sent."""
        return email.message_from_bytes(self.data, policy=policy.default)


def inbound_env(env: dict[str, str], redis_url: str, postmaster_dir: Path,
                port: int) -> dict[str, str]:
    """``env`` with the inbound domain set and a Redis database of its own."""
    base = redis_url.rsplit("/", 1)[0]
    return {**env, "MAILER_INBOUND_DOMAIN": DOMAIN, "MAILER_REDIS_URL": f"{base}/5",
            "MAILER_INBOUND_HOST": "127.0.0.1", "MAILER_INBOUND_PORT": str(port),
            "MAILER_POSTMASTER_DIR": str(postmaster_dir)}


@contextmanager
def inbound_world(env: dict[str, str], redis_url: str, tmp: Path) -> Iterator[World]:
    """Start the API app, a worker and the listener, all configured for :data:`DOMAIN`."""
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.inbound.server import InboundServer
    from mailer.runtime import Runtime

    port = free_port()
    configured = inbound_env(env, redis_url, tmp / "postmaster", port)
    rt = Runtime.from_settings(Settings.from_environ(configured))
    worker = WorkerProcess(configured)
    server = InboundServer(rt)
    server.start()
    try:
        with TestClient(create_app(rt)) as client:
            yield World(client, rt, configured, "127.0.0.1", port, tmp / "postmaster")
    finally:
        server.stop()
        worker.stop()


def send_and_wait(world: World, keys: dict[str, str], smtp_server: Any, *,
                  promotion: bool = False) -> Sent:
    """Register someone, send them a service alert (or a newsletter), wait until sent."""
    address = unique_email("inbound")
    external_id = register(world.client, keys["recipients"], address)
    if promotion:
        r = world.client.post(
            f"/v1/recipients/{external_id}/consents",
            json={"topic": "newsletter", "granted": True, "source": "signup_form",
                  "evidence": {"form": "https://example.test/f", "ip": "192.0.2.1"}},
            headers=auth(keys["recipients"]))
        assert r.status_code == 201, r.text
        sent = send(world.client, keys["marketing"], template="newsletter",
                    to={"email": address, "external_id": external_id},
                    data={"name": "A", "headline": "H", "body": "B"})
        key = keys["marketing"]
    else:
        sent = send(world.client, keys["transactional"], template="service_alert",
                    to={"email": address, "external_id": external_id},
                    data={"name": "A", "title": "T", "body": "B"})
        key = keys["transactional"]
    assert sent.status_code == 202, sent.text
    final = wait_final(world.client, key, sent.json()["id"])
    assert final["status"] == "sent", final
    [item] = [m for m in list(smtp_server.messages)
              if email.message_from_bytes(m.data, policy=policy.default)["Message-ID"]
              == final["message_id"]]
    return Sent(sent.json()["id"], final["message_id"], address, external_id,
                item.mail_from, item.data)


def smtp_send(world: World, rcpt: str, data: bytes,
              mail_from: str = "MAILER-DAEMON@mx.example.net") -> tuple[int, bytes]:
    """One SMTP transaction to the listener; returns the reply to DATA (or to RCPT)."""
    with smtplib.SMTP(world.host, world.port, timeout=30) as smtp:
        smtp.ehlo("mx.example.net")
        smtp.mail(mail_from)
        code, text = smtp.rcpt(rcpt)
        if code != 250:
            smtp.rset()
            return code, text
        # On the wire every line ends in CRLF (RFC 5321 2.3.8); smtplib sends bytes as they
        # are, and the corpus files have LF line ends.
        return smtp.data(re.sub(rb"\r?\n", b"\r\n", data))


def message_status(runtime: Any, row_id: str) -> str:
    """The status of one message row."""
    from mailer.store.schema import messages

    with runtime.engine.connect() as conn:
        return str(conn.execute(select(messages.c.status).where(messages.c.id == row_id))
                   .scalar_one())


def suppression_reasons(runtime: Any, address: str) -> set[str]:
    """The reasons of the suppressions held for ``address``."""
    from mailer.store.schema import suppressions

    hashed = runtime.address(address).hash
    with runtime.engine.connect() as conn:
        return {r.reason for r in conn.execute(
            select(suppressions.c.reason).where(suppressions.c.email_hash == hashed))}


def corpus(name: str) -> bytes:
    """A message from the labelled bounce corpus."""
    return (CORPUS / name).read_bytes()


def fresh_id() -> str:
    """A Message-ID no one has used."""
    return f"<{uuid.uuid4().hex}@mx.example.net>"
