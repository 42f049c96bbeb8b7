"""webhook event log, Mailgun replay tokens, soft-bounce counts, SNS subscriptions

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(length=20), nullable=False),
        sa.Column("event_id", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=20), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("provider", "event_id", name="uq_webhook_events_provider_event"),
    )
    op.create_table(
        "seen_tokens",
        sa.Column("token", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token", name=op.f("pk_seen_tokens")),
    )
    op.create_index("ix_seen_tokens_expires_at", "seen_tokens", ["expires_at"])
    op.create_table(
        "soft_bounces",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email_hash", sa.String(length=64), nullable=False),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_soft_bounces")),
    )
    op.create_index("ix_soft_bounces_hash_time", "soft_bounces", ["email_hash", "occurred_at"])
    op.create_table(
        "sns_subscriptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("topic_arn", sa.String(length=300), nullable=False),
        sa.Column("subscribe_url", sa.String(length=2000), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sns_subscriptions")),
    )


def downgrade() -> None:
    op.drop_table("sns_subscriptions")
    op.drop_index("ix_soft_bounces_hash_time", table_name="soft_bounces")
    op.drop_table("soft_bounces")
    op.drop_index("ix_seen_tokens_expires_at", table_name="seen_tokens")
    op.drop_table("seen_tokens")
    op.drop_table("webhook_events")
