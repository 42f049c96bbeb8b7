"""Shared fixtures: real Redis, real SMTP (aiosmtpd), SQLite or PostgreSQL, real workers.

``MAILER_TEST_DB=postgresql`` runs the database-backed tests against a private PostgreSQL
cluster; the default is SQLite. Every server started here is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.services import (
    PostgresServer,
    RabbitMQServer,
    RedisServer,
    free_port,
    postgres_available,
    rabbitmq_available,
    redis_server_available,
    require,
)

ROOT = Path(__file__).resolve().parent.parent
#: Bearer token of the DSN/ARF webhook in tests.
DSN_TOKEN = "dsn-test-token-0123456789"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that touches the database, so the PostgreSQL pass can select them,
    and leave PostgreSQL-only tests out of the SQLite pass (deselected, not skipped)."""
    for item in items:
        if "db_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)
    if os.environ.get("MAILER_TEST_DB", "sqlite") != "postgresql":
        other = [item for item in items if item.get_closest_marker("postgresql_only")]
        if other:
            config.hook.pytest_deselected(items=other)
            items[:] = [item for item in items if item not in other]


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server with AOF persistence."""
    require("redis-server", redis_server_available(), "redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest.fixture()
def redis() -> Iterator[RedisServer]:
    """A private Redis for one test: only its own workers see the queue and the pace."""
    require("redis-server", redis_server_available(), "redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitMQServer]:
    """A private rabbitmq-server (the other broker, ``MAILER_BROKER_URL=amqp://``)."""
    require("rabbitmq-server", rabbitmq_available(), "rabbitmq-server is not installed")
    with RabbitMQServer() as server:
        yield server


@pytest.fixture(scope="session")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database: SQLite file, or a fresh PostgreSQL database."""
    from mailer.store.db import upgrade

    if os.environ.get("MAILER_TEST_DB", "sqlite") == "postgresql":
        require("postgresql", postgres_available(), "PostgreSQL server binaries missing")
        with PostgresServer() as server:
            url = server.create_database(f"mailer_{uuid.uuid4().hex[:8]}")
            upgrade(url)
            yield url
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'mailer.db'}"
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[Any]:
    """A real aiosmtpd server recording every message it accepts."""
    from tests.smtp_servers import running_smtp_server

    with running_smtp_server() as (host, port, recorder):
        recorder.host, recorder.port = host, port
        yield recorder


def base_env(db_url: str, redis_url: str, smtp_port: int, **extra: str) -> dict[str, str]:
    """The ``MAILER_*`` environment for processes under test."""
    env = {
        "MAILER_ENV": "test",
        "MAILER_SECRET_KEY": "test-secret-key-0123456789abcdef",
        "MAILER_DATABASE_URL": db_url,
        "MAILER_REDIS_URL": redis_url,
        "MAILER_SMTP_HOST": "127.0.0.1",
        "MAILER_SMTP_PORT": str(smtp_port),
        "MAILER_POSTAL_ADDRESS": "Example Ltd, 1 Example Street, 00000 Example City",
        "MAILER_PUBLIC_URL": "https://mail.example.test",
        "MAILER_FROM": "Example <no-reply@example.test>",
        "MAILER_SEND_LEASE": "5s",
        "MAILER_SWEEP_INTERVAL": "1s",
        "MAILER_RETRY_BASE": "1s",
        "MAILER_DSN_WEBHOOK_TOKEN": DSN_TOKEN,
    }
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def env(db_url: str, redis_server: RedisServer, smtp_server: Any) -> dict[str, str]:
    """The environment shared by the API under test and the worker processes."""
    return base_env(db_url, redis_server.url, smtp_server.port)


@pytest.fixture(scope="session")
def runtime(env: dict[str, str]) -> Any:
    """A runtime wired like the web process's."""
    from mailer.config import Settings
    from mailer.runtime import Runtime

    return Runtime.from_settings(Settings.from_environ(env))


@pytest.fixture(scope="session")
def client(runtime: Any) -> Iterator[Any]:
    """An HTTP client for the real ASGI app."""
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app

    with TestClient(create_app(runtime)) as test_client:
        yield test_client


class WorkerProcess:
    """A ``dramatiq workers.actors`` subprocess, stopped by PID."""

    def __init__(self, env: dict[str, str], processes: int = 1, threads: int = 4,
                 extra_args: tuple[str, ...] = ()) -> None:
        full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        # A file, not a pipe: nobody reads a pipe while tests run, and a full pipe buffer
        # would block the worker mid-suite.
        fd, name = tempfile.mkstemp(prefix="mailer-worker-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dramatiq", "workers.actors", "--processes",
                 str(processes), "--threads", str(threads), *extra_args],
                cwd=ROOT, env=full, start_new_session=True,
                stdout=log, stderr=subprocess.STDOUT,
            )

    def log_text(self) -> str:
        """Everything the worker printed so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker process group (parent and forked children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM to the dramatiq parent only (it forwards it), then SIGKILL if need be.

        Signalling the whole group would hand each child the signal twice, and a second
        SIGTERM makes dramatiq's workers exit hard in the middle of a batch.
        """
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def worker(env: dict[str, str]) -> Iterator[WorkerProcess]:
    """One real worker process for the session."""
    proc = WorkerProcess(env)
    yield proc
    proc.stop()


@pytest.fixture()
def keys(runtime: Any) -> dict[str, str]:
    """Fresh API keys, one per role."""
    from mailer.keys import create_key

    scopes = {
        "transactional": ["messages:transactional"],
        "legal": ["messages:legal"],
        "marketing": ["marketing"],
        "recipients": ["recipients"],
        "admin": ["admin"],
    }
    with runtime.engine.begin() as conn:
        return {name: create_key(conn, f"test-{name}", s) for name, s in scopes.items()}


@contextlib.contextmanager
def serving(runtime: Any) -> Iterator[str]:
    """The real app under a real uvicorn on a free loopback port; yields its base URL."""
    import threading

    import uvicorn

    from mailer.api.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=15)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def auth(key: str) -> dict[str, str]:
    """The Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


def unique_email(prefix: str = "user") -> str:
    """An address no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.org"
