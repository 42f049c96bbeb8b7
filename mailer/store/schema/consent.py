"""The recipient's side (SPEC 3, 4, 14): profiles, topics, consent and suppressions.

Also the double opt-in requests still waiting for a confirmation, and the privacy-policy
versions that consent is recorded against.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from mailer.store.schema.base import UtcDateTime, metadata

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
    # SPEC 14: {"de": {"title": ..., "description": ...}}; NULL when there are none.
    Column("translations", JSON),
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

# Privacy-policy versions (SPEC 14). The version in force at a moment is the one with the
# latest ``effective_at`` not after it; ``MAILER_POLICY_VERSION`` when none has passed.
policy_versions = Table(
    "policy_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", String(40), nullable=False, unique=True),
    Column("effective_at", UtcDateTime, nullable=False, index=True),
    Column("summary_url", String(2000)),
    # The policy_update campaign sent when it was registered with notify, if any.
    Column("campaign_id", String(32)),
    Column("api_key_id", Integer),
    Column("created_at", UtcDateTime, nullable=False),
)
