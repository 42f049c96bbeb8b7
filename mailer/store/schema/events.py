"""Outbound event webhooks (SPEC 13): the receivers, the events, their deliveries."""

from __future__ import annotations

from sqlalchemy import JSON, Column, ForeignKey, Index, Integer, String, Table, Text

from mailer.store.schema.base import UtcDateTime, metadata

# The services' receivers (mailer.events). Deleting one keeps the row (``deleted_at`` set,
# secret wiped), so a state change committing at the same moment never trips on the
# foreign key of its delivery rows. ``retry_at`` is the endpoint's own backoff: while it
# fails, one delivery probes it now and then instead of every event hammering it.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("url", String(2000), nullable=False),
    # The event types it receives; NULL is every type, including types added later.
    Column("events", JSON),
    Column("description", String(500)),
    # AES-GCM sealed under a key derived from MAILER_SECRET_KEY (mailer.events.secrets).
    Column("secret", String(200), nullable=False),
    Column("api_key_id", Integer),
    Column("created_at", UtcDateTime, nullable=False),
    Column("deleted_at", UtcDateTime),
    Column("failing_since", UtcDateTime),
    Column("failures", Integer, nullable=False, default=0),
    Column("retry_at", UtcDateTime),
    Column("last_error", String(200)),
    Column("last_error_at", UtcDateTime),
)

# One row per event, written in the transaction of the state change it reports, only when
# some endpoint wants its type. ``body`` is the exact JSON that is signed and sent on
# every attempt; ``message_id`` and ``recipient_id`` let erasure redact it (SPEC 3).
outbound_events = Table(
    "outbound_events",
    metadata,
    Column("id", String(40), primary_key=True),  # the webhook-id, the same on every retry
    Column("type", String(40), nullable=False),
    Column("body", Text, nullable=False),
    Column("message_id", String(32), index=True),
    Column("recipient_id", Integer, index=True),
    Column("created_at", UtcDateTime, nullable=False),
)

# One row per (event, endpoint), fanned out in the same transaction as the event. A
# claimed row's ``next_attempt_at`` is pushed ahead by a lease, so a scheduler killed
# mid-request leaves it due again rather than lost.
outbound_deliveries = Table(
    "outbound_deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("event_id", String(40), ForeignKey("outbound_events.id", ondelete="CASCADE"),
           nullable=False, index=True),
    Column("endpoint_id", String(32), ForeignKey("webhook_endpoints.id"), nullable=False),
    Column("state", String(20), nullable=False),  # pending, delivered, dead, cancelled
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UtcDateTime, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_attempt_at", UtcDateTime),
    Column("delivered_at", UtcDateTime),
    Column("last_error", String(200)),
    Index("ix_outbound_deliveries_state_next", "state", "next_attempt_at"),
    # The delivery thread's claim: one endpoint's due rows, oldest first.
    Index("ix_outbound_deliveries_endpoint_state", "endpoint_id", "state", "next_attempt_at"),
)

# Attempts by result, for ``mailer_webhook_deliveries_total{result}``: a counter that
# survives the pruning of old delivery rows. The migration seeds one row per result.
outbound_delivery_counts = Table(
    "outbound_delivery_counts",
    metadata,
    Column("result", String(20), primary_key=True),
    Column("count", Integer, nullable=False, default=0),
)
