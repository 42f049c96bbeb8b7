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
    # SQLite would otherwise hand an erased person's id to the next registration, and the
    # unsubscribe links in their old mail (which name the id) would act on someone else.
    sqlite_autoincrement=True,
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

# --- webhooks (SPEC 8) --------------------------------------------------------------------

# One row per provider event applied: the unique key makes a redelivered event a no-op.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("provider", String(20), nullable=False),
    Column("event_id", String(200), nullable=False),
    Column("type", String(20), nullable=False),
    Column("message_id", String(32)),
    Column("received_at", UtcDateTime, nullable=False),
    UniqueConstraint("provider", "event_id", name="uq_webhook_events_provider_event"),
)

# Mailgun tokens already accepted: a token is never accepted twice (replay protection).
seen_tokens = Table(
    "seen_tokens",
    metadata,
    Column("token", String(200), primary_key=True),
    Column("expires_at", UtcDateTime, nullable=False, index=True),
)

soft_bounces = Table(
    "soft_bounces",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email_hash", String(64), nullable=False),
    Column("occurred_at", UtcDateTime, nullable=False),
    Index("ix_soft_bounces_hash_time", "email_hash", "occurred_at"),
)

sns_subscriptions = Table(
    "sns_subscriptions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(40), nullable=False),
    Column("topic_arn", String(300), nullable=False),
    Column("subscribe_url", String(2000), nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
)

# Every event a report delivered (bounces and complaints, and the deliveries, delays and
# unsubscribes providers report alongside), with what became of it (SPEC 4): ``applied``,
# ``unmatched`` (not tied to mail we sent: changed nothing) or ``unrecognised`` (no usable
# recipient, or beyond the per-report limit: changed nothing). /metrics sums ``count`` by
# source and result. Only the keyed hash of an address is kept, never the address: an
# unmatched report may name someone we never mailed.
bounce_reports = Table(
    "bounce_reports",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("source", String(20), nullable=False),
    Column("result", String(20), nullable=False),
    Column("event_type", String(20), nullable=False),
    Column("reason", String(40)),
    Column("email_hash", String(64)),
    Column("message_id", String(32)),
    # SHA-256 of the provider's event id: some ids embed the address (SES's do), and
    # this table keeps none in clear; a repeat of the same report has the same key.
    Column("event_key", String(64)),
    # More than one only for an aggregate row (the events of a report beyond the limit).
    Column("count", Integer, nullable=False, default=1),
    Column("received_at", UtcDateTime, nullable=False),
    Index("ix_bounce_reports_source_result", "source", "result"),
    # A redelivered report that changed nothing is found here and counted once.
    Index("ix_bounce_reports_source_event", "source", "event_key"),
)

# What the reader could not read (SPEC 4): the MIME structure and an excerpt of the top-level
# header fields, never a body, with the local part of every address masked, so that an
# operator sees the blind spot (``mailer bounces unrecognised``). Bounded per row and per
# day, and pruned after a fortnight (mailer.reports.intake).
unrecognised_reports = Table(
    "unrecognised_reports",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("source", String(20), nullable=False),
    Column("reader", String(40), nullable=False),
    Column("size", Integer, nullable=False),
    Column("structure", String(500), nullable=False),
    Column("headers", Text, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    Index("ix_unrecognised_reports_received_at", "received_at"),
)

# --- the recipient's side (SPEC 3) -------------------------------------------------------

# Double opt-in (SPEC 3): a self-service grant for a topic marked ``double_opt_in`` waits
# here until the recipient confirms from the link mailed to them; only then does the
# ledger get a grant (source ``double_opt_in``). Erasure deletes these rows.
consent_requests = Table(
    "consent_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("recipient_id", Integer, ForeignKey("recipients.id", ondelete="CASCADE"),
           nullable=False),
    Column("topic", String(100), nullable=False),
    Column("source", String(40), nullable=False),
    Column("policy_version", String(40), nullable=False),
    Column("evidence", JSON),
    Column("requested_at", UtcDateTime, nullable=False),
    Column("recorded_at", UtcDateTime, nullable=False),
    Column("confirmed_at", UtcDateTime),
    Column("message_id", String(32)),
    Index("ix_consent_requests_recipient_topic", "recipient_id", "topic"),
)

# --- campaigns (SPEC 9) ------------------------------------------------------------------

# One row per campaign. The row is also the fan-out's checkpoint: ``last_recipient_id`` is
# the keyset cursor, advanced by compare-and-set in the same transaction that writes a
# batch's messages, so a restarted (or second) scheduler resumes without duplicating.
campaigns = Table(
    "campaigns",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("template", String(100), nullable=False),
    Column("topic", String(100), nullable=False),
    Column("data", JSON, nullable=False),
    Column("audience", JSON),
    Column("send_at", UtcDateTime, nullable=False),
    Column("rate_per_minute", Integer),
    Column("status", String(20), nullable=False),
    # Set when the scheduler first saw it past MAILER_CAMPAIGN_MAX_LATENESS (SPEC 9).
    Column("late", Boolean, nullable=False, default=False),
    # Set by an explicit resume: start even though send_at is long past.
    Column("allow_late", Boolean, nullable=False, default=False),
    Column("api_key_id", Integer),
    Column("last_recipient_id", Integer, nullable=False, default=0),
    Column("max_recipient_id", Integer),
    Column("audience_count", Integer),
    Column("written", Integer, nullable=False, default=0),
    Column("next_batch_at", UtcDateTime),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("started_at", UtcDateTime),
    Column("paused_at", UtcDateTime),
    Column("fanned_out_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Index("ix_campaigns_status_send_at", "status", "send_at"),
)

# Marketing templates stored through PUT /v1/templates/{name}; file templates win a name.
marketing_templates = Table(
    "marketing_templates",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("category", String(40), nullable=False),
    Column("topic", String(100), nullable=False),
    Column("subject", Text, nullable=False),
    Column("html", Text, nullable=False),
    Column("text", Text),
    Column("variables", JSON, nullable=False),
    Column("version", Integer, nullable=False),
    Column("api_key_id", Integer),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

# One message per address per campaign, enforced by the database as well as the fan-out;
# NULL campaign ids (single sends) and erased (NULL) hashes never collide.
Index("uq_messages_campaign_to_hash", messages.c.campaign_id, messages.c.to_hash, unique=True)
# Campaign counts (GROUP BY status, reason) and the "anything left?" check read only this.
Index("ix_messages_campaign_status", messages.c.campaign_id, messages.c.status,
      messages.c.reason)
