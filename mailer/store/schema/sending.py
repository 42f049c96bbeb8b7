"""Messages through their lifecycle (SPEC 5), and the event history of each."""

from __future__ import annotations

from sqlalchemy import JSON, Column, ForeignKey, Index, Integer, String, Table

from mailer.store.schema.base import UtcDateTime, metadata

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("api_key_id", Integer),
    # Looked up through ix_messages_campaign_status and uq_messages_campaign_to_hash.
    Column("campaign_id", String(32)),
    Column("category", String(40), nullable=False),
    Column("template", String(100), nullable=False),
    Column("topic", String(100)),
    Column("recipient_id", Integer, ForeignKey("recipients.id", ondelete="SET NULL")),
    Column("to_email", String(320)),
    Column("to_name", String(200)),
    # Looked up through ix_messages_to_hash_category (its first column).
    Column("to_hash", String(64)),
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
    # SPEC 14: the caller's ``locale`` for this message; NULL means the recipient's.
    Column("locale", String(35)),
    Index("ix_messages_status_updated", "status", "updated_at"),
    Index("ix_messages_to_hash_category", "to_hash", "category", "created_at"),
    # GET /v1/messages: newest first, keyset-paged on (created_at, id).
    Index("ix_messages_created_id", "created_at", "id"),
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

# Both indexes below hold the rows of a campaign only: every query they serve names a
# campaign (which implies NOT NULL, so both planners use them), and a single send then
# costs neither a B-tree insert here nor an entry moved on each status change.
_IN_A_CAMPAIGN = messages.c.campaign_id.is_not(None)
# One message per address per campaign, enforced by the database as well as the fan-out;
# erased (NULL) hashes never collide.
Index("uq_messages_campaign_to_hash", messages.c.campaign_id, messages.c.to_hash, unique=True,
      sqlite_where=_IN_A_CAMPAIGN, postgresql_where=_IN_A_CAMPAIGN)
# Campaign counts (GROUP BY status, reason) and the "anything left?" check read only this.
Index("ix_messages_campaign_status", messages.c.campaign_id, messages.c.status,
      messages.c.reason, sqlite_where=_IN_A_CAMPAIGN, postgresql_where=_IN_A_CAMPAIGN)
