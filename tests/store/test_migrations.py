"""The migrations build exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, text

from mailer.store.db import MIGRATIONS_DIR, make_engine, upgrade
from mailer.store.listing import MessageFilter, list_messages
from mailer.store.schema import messages, metadata


def test_the_migrated_schema_is_the_declared_schema(db_url: str) -> None:
    # Given a database migrated to head (the session's: SQLite, or PostgreSQL in that pass)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            # When alembic compares it with the tables and indexes the code declares
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    # Then nothing differs: no index or column exists in one and not the other
    assert diffs == []


def _indexes(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return {ix["name"] for ix in inspect(engine).get_indexes("messages") if ix["name"]}
    finally:
        engine.dispose()


def test_0009_replaces_the_prefix_indexes_and_goes_back(tmp_path: Path) -> None:
    # Given a database at 0008, with the two single-column indexes 0001 made
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0008")
    assert {"ix_messages_campaign_id", "ix_messages_to_hash"} <= _indexes(url)
    # When it is upgraded to 0009
    upgrade(url, "0009")
    # Then those are gone, the listing index is there, and the wider ones still serve
    # campaign and address lookups
    after = _indexes(url)
    assert not {"ix_messages_campaign_id", "ix_messages_to_hash"} & after
    assert {"ix_messages_created_id", "ix_messages_campaign_status",
            "uq_messages_campaign_to_hash", "ix_messages_to_hash_category"} <= after
    # And the downgrade restores 0008's indexes
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url
    command.downgrade(config, "0008")
    assert {"ix_messages_campaign_id", "ix_messages_to_hash"} <= _indexes(url)
    assert "ix_messages_created_id" not in _indexes(url)


def test_a_page_of_the_newest_messages_reads_the_index_not_the_table(tmp_path: Path) -> None:
    # Given 300 messages on SQLite
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = make_engine(url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(insert(messages), [
            {"id": f"{n:032x}", "category": "service_alert", "template": "t",
             "status": "sent", "attempts": 1, "message_id_header": f"<{n}@example.test>",
             "created_at": start + timedelta(seconds=n), "updated_at": start}
            for n in range(300)])
    try:
        with engine.connect() as conn:
            # When the first page is listed, newest first
            page, cursor = list_messages(conn, MessageFilter(), limit=50)
            # Then it is the 50 newest, with a cursor to the next page
            assert [r.id for r in page] == [f"{n:032x}" for n in range(299, 249, -1)]
            assert cursor is not None
            # And SQLite walks ix_messages_created_id instead of sorting every row
            plan = " ".join(str(row[-1]) for row in conn.execute(text(
                "EXPLAIN QUERY PLAN SELECT * FROM messages "
                "ORDER BY created_at DESC, id DESC LIMIT 51")))
            assert "ix_messages_created_id" in plan and "TEMP B-TREE" not in plan, plan
    finally:
        engine.dispose()
