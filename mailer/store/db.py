"""Engine creation and schema migration; the one place that knows SQLite from PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, text
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


#: How long a SQLite statement waits for a lock before "database is locked" (ms).
BUSY_TIMEOUT_MS = 30_000
#: How long :func:`checkpoint_wal` may hold new writers back waiting for readers (ms).
CHECKPOINT_WAIT_MS = 200


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout turns lock contention
    # between the web, worker and scheduler processes into waiting instead of errors.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


#: Connection option marking a transaction that writes: on SQLite it begins IMMEDIATE.
WRITES = "mailer_writes"


class _SqliteEngine(Engine):
    """``begin()`` writes and takes SQLite's write lock at BEGIN; ``connect()`` reads.

    A transaction that reads before it writes (every compare-and-set here) must hold the
    write lock from its start: in WAL mode, upgrading a read snapshot that another writer
    has since moved past fails at once with SQLITE_BUSY, without waiting. A read-only
    connection (``connect()``, never committed) begins DEFERRED instead, so it reads its
    snapshot alongside a writer rather than queueing behind every write transaction.
    """

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection in a write transaction, committed at the end (as ``Engine.begin``)."""
        with self.connect() as conn:
            conn.execution_options(**{WRITES: True})
            with conn.begin():
                yield conn


def make_engine(url: str, pool_size: int | None = None) -> Engine:
    """Create an engine for ``url``, creating the SQLite file's folder when needed.

    ``pool_size`` caps a server database's connections from this process exactly (a
    worker passes its threads + 1); without it the pool may grow to 30.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own BEGIN handling defers locks: we BEGIN ourselves, IMMEDIATE for
        # write transactions so compare-and-set never hits "database is locked" on
        # upgrade, DEFERRED for reads (_SqliteEngine).
        @event.listens_for(engine, "connect")
        def _no_auto_begin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            writes = conn.get_execution_options().get(WRITES, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")

        engine.__class__ = _SqliteEngine

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if pool_size is not None:
        # A hard cap, no overflow: PostgreSQL's max_connections is shared by every process
        # on every host, so each one's share must be known (docs/capacity.md).
        return create_engine(url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True)
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


#: WAL frames (pages written since the last reset) past which :func:`checkpoint_wal` resets
#: the log: 4096 frames of 4 KiB pages, 16 MiB.
WAL_MAX_FRAMES = 4096


def checkpoint_wal(engine: Engine, max_frames: int = WAL_MAX_FRAMES) -> int | None:
    """On SQLite, copy the WAL into the database, and cut it back to empty once it holds
    more than ``max_frames``; return the frames it held (None on other databases).

    SQLite's own checkpoint after each commit (PASSIVE) never waits, so while some
    connection always has a read open, as with the API, workers and scheduler busy, the
    WAL is never reset: it grew to 215 MB in a 40,000-message benchmark, and every page
    read searched a wal-index that long, and every commit's checkpoint copied a little
    more of it. TRUNCATE waits for the reads and the write under way to end, holding new
    writers back meanwhile: usually a few milliseconds, then the log starts again from
    nothing. It waits :data:`CHECKPOINT_WAIT_MS` at most, so a long read (an export) costs
    writers no more than that; the next call tries again. The scheduler calls this between
    its jobs.
    """
    if engine.dialect.name != "sqlite":
        return None
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        _busy, frames, _copied = cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames > max_frames:
            cursor.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
            try:
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()
    finally:
        raw.close()
    return int(frames)


def refresh_statistics(engine: Engine, *tables: Table) -> bool:
    """On PostgreSQL, ANALYZE ``tables`` now (no table: every one); return whether it ran
    (False elsewhere).

    For a bulk load. Until autovacuum's next pass (up to ``autovacuum_naptime``, a minute
    by default) the planner keeps the statistics it had before the load, or none for a
    table never analysed, and plans the workers' batched ``IN (...)`` lookups as
    sequential scans: measured on 21,000 fresh suppressions, 3.0 ms instead of 0.3 ms for
    100 keys, on every slice a worker sends. SQLite keeps no statistics unless asked and
    is left as it is (its planner's defaults favour the indexes).
    """
    if engine.dialect.name != "postgresql":
        return False
    names = ", ".join(engine.dialect.identifier_preparer.format_table(t) for t in tables)
    with engine.begin() as conn:
        conn.execute(text(f"ANALYZE {names}".rstrip()))
    return True


def upgrade(url: str, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision``."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url
    command.upgrade(config, revision)
