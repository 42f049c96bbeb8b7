"""What providers and inbound mail report back (SPEC 4, 8, 12).

Provider webhook events, Mailgun tokens seen and SNS subscription requests, soft bounces,
and every bounce report with what became of it, including what no reader could read.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, String, Table, Text, UniqueConstraint

from mailer.store.schema.base import UtcDateTime, metadata

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
