"""The private Redis and PostgreSQL servers the suite relies on really start, persist and stop."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa

from tests.services import (
    PostgresServer,
    RedisServer,
    ServiceError,
    chromium_path,
    pid_alive,
    postgres_available,
    redis_server_available,
    require,
)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh private Redis for one test."""
    require("redis-server", redis_server_available(), "install the redis-server package")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL cluster shared by this module's tests."""
    require("PostgreSQL", postgres_available(), "install the postgresql package")
    with PostgresServer() as server:
        yield server


def test_redis_answers_ping_and_stores_a_key(redis_server: RedisServer) -> None:
    # Given a started private Redis
    client = redis.Redis.from_url(redis_server.url)
    # When a key is written
    client.set("greeting", "hello")
    # Then it answers on its own loopback port, with AOF persistence on
    assert client.ping() is True
    assert client.get("greeting") == b"hello"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    client.close()


def test_redis_key_survives_kill_9_and_restart(redis_server: RedisServer) -> None:
    # Given a key written while every write is fsynced (so the test need not wait for the
    # once-per-second fsync of production's everysec)
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("appendfsync", "always")
    client.set("queued", "message-1")
    client.close()
    old_pid = redis_server.pid
    # When the server is killed as a crash would and started again on the same dir
    redis_server.kill()
    assert not pid_alive(old_pid)
    redis_server.restart()
    # Then the AOF replay brings the key back, on the same port, in a new process
    client = redis.Redis.from_url(redis_server.url)
    assert client.get("queued") == b"message-1"
    assert redis_server.pid != old_pid
    client.close()


def test_redis_stop_ends_the_process_and_close_removes_its_dir() -> None:
    # Given a running private Redis
    require("redis-server", redis_server_available(), "install the redis-server package")
    server = RedisServer().start()
    pid = server.pid
    # When it is stopped
    server.stop()
    # Then its process is gone and it reports as not running, but its data dir stays
    assert not pid_alive(pid)
    with pytest.raises(ServiceError):
        _ = server.pid
    assert server.directory.exists()
    # And closing removes the temp dir it created
    server.close()
    assert not server.directory.exists()


def test_postgres_answers_select_1(postgres_server: PostgresServer) -> None:
    # Given a started private cluster
    engine = sa.create_engine(postgres_server.url)
    # When it is queried over TCP on 127.0.0.1
    with engine.connect() as conn:
        one = conn.execute(sa.text("select 1")).scalar_one()
        fsync = conn.execute(sa.text("show fsync")).scalar_one()
        listen = conn.execute(sa.text("show listen_addresses")).scalar_one()
        max_connections = conn.execute(sa.text("show max_connections")).scalar_one()
    engine.dispose()
    # Then it answers, with the test-speed settings and loopback-only listening
    assert one == 1
    assert fsync == "off"
    assert listen == "127.0.0.1"
    assert max_connections == "200"
    assert postgres_server.url.startswith("postgresql+psycopg://")
    assert pid_alive(postgres_server.pid)


def test_postgres_create_database_is_isolated(postgres_server: PostgresServer) -> None:
    # Given two databases created for two tests
    first_url = postgres_server.create_database("isolation_a")
    second_url = postgres_server.create_database("isolation_b")
    first, second = sa.create_engine(first_url), sa.create_engine(second_url)
    # When a table is created and filled in the first
    with first.begin() as conn:
        conn.execute(sa.text("create table marker (id int)"))
        conn.execute(sa.text("insert into marker values (7)"))
    # Then the first sees it and the second does not have the table at all
    with first.connect() as conn:
        assert conn.execute(sa.text("select id from marker")).scalar_one() == 7
    with second.connect() as conn:
        assert not sa.inspect(conn).has_table("marker")
        assert conn.execute(sa.text("select current_database()")).scalar_one() == "isolation_b"
    first.dispose()
    second.dispose()


def test_postgres_rejects_unsafe_database_names(postgres_server: PostgresServer) -> None:
    # Given / When a name that is not a plain lowercase identifier / Then it is refused
    with pytest.raises(ValueError):
        postgres_server.create_database('x"; drop database mailer; --')


def test_postgres_stop_ends_the_postmaster() -> None:
    # Given a running private cluster
    require("PostgreSQL", postgres_available(), "install the postgresql package")
    server = PostgresServer().start()
    pid = server.pid
    directory = server.directory
    # When it is closed
    server.close()
    # Then the postmaster is gone and its temp dir removed
    assert not pid_alive(pid)
    assert directory is not None and not directory.exists()


def test_chromium_path_points_at_an_executable() -> None:
    # Given the machine set up by install-deps --test / When asked / Then chromium is found
    path = chromium_path()
    require("chromium", path is not None, "install the chromium package")
    assert path is not None and os.access(path, os.X_OK)


def test_require_skips_outside_ci_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a missing service
    # When not under CI, Then the test is skipped
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("thing", False, "not installed")
    # When under CI, Then the test fails instead
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require("thing", False, "not installed")
    # And an available service passes silently
    require("thing", True, "unused")
