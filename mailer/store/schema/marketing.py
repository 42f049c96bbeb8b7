"""Campaigns (SPEC 9) and the stored marketing templates they and single sends use."""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, Index, Integer, String, Table, Text

from mailer.store.schema.base import UtcDateTime, metadata

# One row per campaign. The row is also the fan-out's checkpoint: ``last_recipient_id`` is
# the keyset cursor, advanced by compare-and-set in the same transaction that writes a
# batch's messages, so a restarted (or second) scheduler resumes without duplicating.
campaigns = Table(
    "campaigns",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("template", String(100), nullable=False),
    # The template's category: promotions (with a topic), or service alerts to active
    # accounts, such as a privacy-policy update (SPEC 14), which have no topic.
    Column("category", String(40), nullable=False, default="promotion",
           server_default="promotion"),
    Column("topic", String(100)),
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
    # SPEC 14: {"de": {"subject": ..., "html": ..., "text": ...}}; NULL when there are none.
    Column("translations", JSON),
    Column("version", Integer, nullable=False),
    Column("api_key_id", Integer),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
