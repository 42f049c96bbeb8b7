"""The migrations build exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, text
from sqlalchemy.exc import IntegrityError

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


def _index_sql(url: str, name: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SELECT sql FROM sqlite_master WHERE name = :n"),
                                    {"n": name}).scalar_one())
    finally:
        engine.dispose()


def test_0010_keeps_campaign_indexes_to_campaign_rows_and_their_queries_on_them(
        tmp_path: Path) -> None:
    # Given a database at 0009, whose campaign indexes hold every message
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0009")
    assert "WHERE" not in _index_sql(url, "ix_messages_campaign_status")
    # When it is upgraded to 0010
    upgrade(url, "0010")
    # Then both hold only the rows of a campaign
    for name in ("uq_messages_campaign_to_hash", "ix_messages_campaign_status"):
        assert _index_sql(url, name).endswith("WHERE campaign_id IS NOT NULL"), name
    engine = make_engine(url)
    now = datetime(2026, 11, 29, tzinfo=UTC)

    def row(n: int, campaign: str | None, to_hash: str) -> dict[str, object]:
        return {"id": f"{n:032x}", "campaign_id": campaign, "category": "promotion",
                "template": "t", "to_hash": to_hash, "status": "queued", "attempts": 0,
                "message_id_header": f"<{n}@example.test>", "created_at": now,
                "updated_at": now}

    try:
        # And one address per campaign still holds, while single sends may repeat it
        with engine.begin() as conn:
            conn.execute(insert(messages), [row(1, "c1", "h"), row(2, None, "h"),
                                            row(3, None, "h"), row(4, "c2", "h")])
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(insert(messages), [row(5, "c1", "h")])
        # And the queries that name a campaign are answered from the partial indexes
        with engine.connect() as conn:
            for query, index in [
                ("SELECT status, reason, count(*) FROM messages WHERE campaign_id IN "
                 "('c1', 'c2') GROUP BY campaign_id, status, reason",
                 "ix_messages_campaign_status"),
                ("SELECT to_hash FROM messages WHERE campaign_id = 'c1' AND to_hash IN "
                 "('h', 'x')", "uq_messages_campaign_to_hash"),
            ]:
                plan = " ".join(str(r[-1]) for r in conn.execute(
                    text(f"EXPLAIN QUERY PLAN {query}")))
                assert index in plan, plan
    finally:
        engine.dispose()
    # And the downgrade puts the full indexes back
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url
    command.downgrade(config, "0009")
    assert "WHERE" not in _index_sql(url, "uq_messages_campaign_to_hash")
