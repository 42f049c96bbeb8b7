"""Database tables (SQLAlchemy Core); Alembic migrations create them, never ``create_all``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, so SQLite and PostgreSQL compare alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQL on SQLite may hand back text
            value = datetime.fromisoformat(value)
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    # The key is shown once; we keep its public prefix for lookup and a SHA-256 of the whole.
    Column("prefix", String(32), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False),
    Column("scopes", String(500), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("revoked_at", UtcDateTime),
)

recipients = Table(
    "recipients",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("external_id", String(200), nullable=False, unique=True),
    Column("email", String(320), nullable=False),
    # Keyed hash of the normalised address: how suppressions and history are matched.
    Column("email_hash", String(64), nullable=False, index=True),
    Column("name", String(200)),
    Column("locale", String(35)),
    Column("attributes", JSON, nullable=False, default=dict),
    Column("account_active", Boolean, nullable=False, default=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

topics = Table(
    "topics",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("title", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("third_party", Boolean, nullable=False, default=False),
    Column("double_opt_in", Boolean, nullable=False, default=False),
    Column("created_at", UtcDateTime, nullable=False),
)

# Append-only (SPEC 3): rows are inserted, never updated, except that erasure sets
# recipient_id to NULL (pseudonymisation) and keeps email_hash as the proof link.
consent_events = Table(
    "consent_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("recipient_id", Integer, ForeignKey("recipients.id", ondelete="SET NULL")),
    Column("email_hash", String(64), nullable=False, index=True),
    Column("topic", String(100), nullable=False),
    Column("granted", Boolean, nullable=False),
    Column("source", String(40), nullable=False),
    Column("policy_version", String(40), nullable=False),
    Column("occurred_at", UtcDateTime, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
    Column("evidence", JSON),
    Index("ix_consent_events_recipient_topic", "recipient_id", "topic"),
)

suppressions = Table(
    "suppressions",
    metadata,
    Column("id", Integer, primary_key=True),
    # NULL once the address is erased: only the keyed hash remains (SPEC 3).
    Column("email", String(320)),
    Column("email_hash", String(64), nullable=False, index=True),
    Column("scope", String(20), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("source", String(200), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime),
    UniqueConstraint("email_hash", "reason", name="uq_suppressions_hash_reason"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("api_key_id", Integer),
    Column("campaign_id", String(32), index=True),
    Column("category", String(40), nullable=False),
    Column("template", String(100), nullable=False),
    Column("topic", String(100)),
    Column("recipient_id", Integer, ForeignKey("recipients.id", ondelete="SET NULL")),
    Column("to_email", String(320)),
    Column("to_name", String(200)),
    Column("to_hash", String(64), index=True),
    Column("data", JSON),
    Column("status", String(20), nullable=False),
    Column("reason", String(40)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("message_id_header", String(200), nullable=False, unique=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("send_at", UtcDateTime),
    Column("next_attempt_at", UtcDateTime),
    Column("lease_until", UtcDateTime),
    Column("sent_at", UtcDateTime),
    Column("smtp_code", Integer),
    Column("smtp_response", String(500)),
    Index("ix_messages_status_updated", "status", "updated_at"),
    Index("ix_messages_to_hash_category", "to_hash", "category", "created_at"),
)

message_events = Table(
    "message_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("message_id", String(32), ForeignKey("messages.id", ondelete="CASCADE"),
           nullable=False, index=True),
    Column("at", UtcDateTime, nullable=False),
    Column("type", String(40), nullable=False),
    Column("detail", String(500)),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("api_key_id", Integer, nullable=False),
    Column("key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response", JSON, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("api_key_id", "key", name="uq_idempotency_keys_key"),
)

