"""SQLite transactions: writes take the write lock at BEGIN, reads never queue behind it."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, event, func, insert, select, text

from mailer.store.db import checkpoint_wal, make_engine, upgrade
from mailer.store.schema import topics

NOW = datetime(2026, 11, 29, tzinfo=UTC)
#: The topics these tests add (the migrations seed others).
OURS = topics.c.name.startswith("t-")


def _engine_with_log(path: Path) -> tuple[Engine, list[str]]:
    url = f"sqlite:///{path / 'mailer.db'}"
    upgrade(url)
    engine = make_engine(url)
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _log(_conn: Connection, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    return engine, statements


def test_write_transactions_begin_immediate_and_reads_begin_deferred(tmp_path: Path) -> None:
    # Given an engine on a migrated SQLite file
    engine, statements = _engine_with_log(tmp_path)
    # When one block writes and another only reads
    with engine.begin() as conn:
        conn.execute(insert(topics).values(name="t-news", title="News", created_at=NOW))
    with engine.connect() as conn:
        names = conn.execute(select(topics.c.name).where(OURS)).scalars().all()
    # Then the write began IMMEDIATE, the read a plain (deferred) BEGIN, and both worked
    begins = [s for s in statements if s.startswith("BEGIN")]
    assert begins == ["BEGIN IMMEDIATE", "BEGIN"]
    assert names == ["t-news"]


def test_an_open_read_does_not_hold_up_a_writer(tmp_path: Path) -> None:
    # Given a reader in the middle of a transaction (its snapshot taken)
    engine, _ = _engine_with_log(tmp_path)
    with engine.connect() as reader:
        assert reader.execute(select(topics.c.name).where(OURS)).scalars().all() == []
        # When a writer on another connection inserts and commits
        done = threading.Event()

        def write() -> None:
            with engine.begin() as conn:
                conn.execute(insert(topics).values(name="t-news", title="News", created_at=NOW))
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        # Then it commits at once (were the read holding the write lock, it would wait
        # out the 30 s busy timeout), and the reader keeps its own snapshot
        assert done.wait(timeout=5), "the writer waited for a read-only transaction"
        writer.join(timeout=5)
        assert reader.execute(select(topics.c.name).where(OURS)).scalars().all() == []
    with engine.connect() as fresh:
        assert fresh.execute(select(topics.c.name).where(OURS)).scalars().all() == ["t-news"]


def test_write_transactions_wait_for_each_other_from_begin(tmp_path: Path) -> None:
    # Given a write transaction that has read but not yet written
    engine, _ = _engine_with_log(tmp_path)
    order: list[str] = []
    first_in = threading.Event()
    release = threading.Event()

    def first() -> None:
        with engine.begin() as conn:
            conn.execute(text("SELECT count(*) FROM topics WHERE name LIKE 't-%'")).scalar_one()
            first_in.set()
            release.wait(timeout=10)
            conn.execute(insert(topics).values(name="t-a", title="A", created_at=NOW))
            order.append("first committed")

    def second() -> None:
        with engine.begin() as conn:
            order.append("second began")
            count = conn.execute(
                text("SELECT count(*) FROM topics WHERE name LIKE 't-%'")).scalar_one()
            conn.execute(insert(topics).values(name=f"t-b{count}", title="B", created_at=NOW))

    one = threading.Thread(target=first)
    one.start()
    assert first_in.wait(timeout=10)
    # When a second writer begins meanwhile
    two = threading.Thread(target=second)
    two.start()
    time.sleep(0.3)
    assert order == []  # it is still waiting at its BEGIN
    release.set()
    one.join(timeout=10)
    two.join(timeout=10)
    # Then it began only after the first committed, and read the first one's row: no
    # lost update, no "database is locked"
    assert order == ["first committed", "second began"]
    with engine.connect() as conn:
        assert sorted(conn.execute(select(topics.c.name).where(OURS)).scalars()) == ["t-a", "t-b1"]


def test_a_wal_kept_from_resetting_by_readers_is_cut_back(tmp_path: Path) -> None:
    # Given a reader that always has a snapshot open while a writer commits page after page
    engine, _ = _engine_with_log(tmp_path)
    wal = tmp_path / "mailer.db-wal"
    with engine.connect() as reader:
        for batch in range(40):
            reader.execute(select(topics.c.name).where(OURS)).all()  # a fresh snapshot
            with engine.begin() as conn:
                conn.execute(insert(topics), [
                    {"name": f"t-{batch}-{i}", "title": "x" * 400, "created_at": NOW}
                    for i in range(50)])
            reader.commit()
            reader.execute(select(topics.c.name).where(OURS)).all()
        # Then SQLite's own checkpoints could not reset the log: it only grew
        grown = wal.stat().st_size
        assert grown > 200 * 4096
    # When the scheduler's checkpoint runs with the readers gone
    frames = checkpoint_wal(engine, max_frames=100)
    # Then it saw the long log and cut the file back to nothing, nothing lost
    assert frames is not None and frames > 100
    assert wal.stat().st_size == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(topics).where(OURS)).scalar() == 2000
    # And a short log is only copied, not waited for
    with engine.begin() as conn:
        conn.execute(insert(topics).values(name="t-last", title="x", created_at=NOW))
    assert checkpoint_wal(engine, max_frames=100) == wal.stat().st_size // (4096 + 24)


def test_a_long_read_delays_the_cut_not_the_writers(tmp_path: Path) -> None:
    # Given a long WAL and a reader in the middle of a long read (an export, say)
    engine, _ = _engine_with_log(tmp_path)
    wal = tmp_path / "mailer.db-wal"
    with engine.begin() as conn:
        conn.execute(insert(topics), [{"name": f"t-{i}", "title": "x" * 400,
                                       "created_at": NOW} for i in range(500)])
    reader = engine.connect()
    reader.execute(select(topics.c.name).where(OURS)).all()
    with engine.begin() as conn:
        conn.execute(insert(topics).values(name="t-late", title="x", created_at=NOW))
    before = wal.stat().st_size
    # When the scheduler's checkpoint runs meanwhile (in a thread: the reader stays open)
    done = threading.Event()
    checkpointer = threading.Thread(
        target=lambda: (checkpoint_wal(engine, max_frames=10), done.set()))
    checkpointer.start()
    checkpointer.join(10)
    # Then it gave up on the cut rather than wait the reader out (while a TRUNCATE is
    # pending, new writers wait): it returned with the read still open, the log intact
    assert done.is_set()
    assert wal.stat().st_size >= before > 0
    with engine.begin() as conn:
        conn.execute(insert(topics).values(name="t-after", title="x", created_at=NOW))
    # And every pooled connection keeps the normal busy timeout
    held = [engine.raw_connection() for _ in range(4)]
    assert {c.cursor().execute("PRAGMA busy_timeout").fetchone()[0] for c in held} == {30_000}
    for c in held:
        c.close()
    # And once the read ends, the next call cuts the log back
    reader.close()
    checkpoint_wal(engine, max_frames=10)
    assert wal.stat().st_size == 0


def test_checkpoint_is_a_no_op_on_postgresql() -> None:
    engine = make_engine("postgresql://nobody@127.0.0.1:9/none")
    assert checkpoint_wal(engine) is None
