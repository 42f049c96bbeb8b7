"""outbound event webhooks: endpoints and the event outbox (SPEC 13)

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

#: The results ``mailer_webhook_deliveries_total`` counts (mailer.events.delivery.Result),
#: seeded here so that recording an attempt is a plain UPDATE, never an upsert.
RESULTS = ("delivered", "failed", "refused", "dead")


def upgrade() -> None:
    """Create the endpoint, event, delivery and counter tables."""
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("events", sa.JSON(), nullable=True),
        sa.Column("description", sa.String(length=500), nullable=True),
        sa.Column("secret", sa.String(length=200), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(), nullable=True),
        sa.Column("failing_since", sa.DateTime(), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.Column("last_error_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_table(
        "outbound_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=True),
        sa.Column("recipient_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_events")),
    )
    op.create_index("ix_outbound_events_message_id", "outbound_events", ["message_id"])
    op.create_index("ix_outbound_events_recipient_id", "outbound_events", ["recipient_id"])
    op.create_table(
        "outbound_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint_id", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"], ["outbound_events.id"], ondelete="CASCADE",
            name=op.f("fk_outbound_deliveries_event_id_outbound_events")),
        sa.ForeignKeyConstraint(
            ["endpoint_id"], ["webhook_endpoints.id"],
            name=op.f("fk_outbound_deliveries_endpoint_id_webhook_endpoints")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_deliveries")),
    )
    op.create_index("ix_outbound_deliveries_event_id", "outbound_deliveries", ["event_id"])
    op.create_index("ix_outbound_deliveries_state_next", "outbound_deliveries",
                    ["state", "next_attempt_at"])
    op.create_index("ix_outbound_deliveries_endpoint_state", "outbound_deliveries",
                    ["endpoint_id", "state", "next_attempt_at"])
    counts = op.create_table(
        "outbound_delivery_counts",
        sa.Column("result", sa.String(length=20), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("result", name=op.f("pk_outbound_delivery_counts")),
    )
    op.bulk_insert(counts, [{"result": result, "count": 0} for result in RESULTS])


def downgrade() -> None:
    """Drop what upgrade created."""
    op.drop_table("outbound_delivery_counts")
    op.drop_index("ix_outbound_deliveries_endpoint_state", table_name="outbound_deliveries")
    op.drop_index("ix_outbound_deliveries_state_next", table_name="outbound_deliveries")
    op.drop_index("ix_outbound_deliveries_event_id", table_name="outbound_deliveries")
    op.drop_table("outbound_deliveries")
    op.drop_index("ix_outbound_events_recipient_id", table_name="outbound_events")
    op.drop_index("ix_outbound_events_message_id", table_name="outbound_events")
    op.drop_table("outbound_events")
    op.drop_table("webhook_endpoints")
