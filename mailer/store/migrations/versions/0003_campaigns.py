"""campaigns, stored marketing templates, one message per address per campaign (SPEC 7, 9)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("template", sa.String(length=100), nullable=False),
        sa.Column("topic", sa.String(length=100), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("audience", sa.JSON(), nullable=True),
        sa.Column("send_at", sa.DateTime(), nullable=False),
        sa.Column("rate_per_minute", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("late", sa.Boolean(), nullable=False),
        sa.Column("allow_late", sa.Boolean(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("last_recipient_id", sa.Integer(), nullable=False),
        sa.Column("max_recipient_id", sa.Integer(), nullable=True),
        sa.Column("audience_count", sa.Integer(), nullable=True),
        sa.Column("written", sa.Integer(), nullable=False),
        sa.Column("next_batch_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("paused_at", sa.DateTime(), nullable=True),
        sa.Column("fanned_out_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaigns")),
    )
    op.create_index("ix_campaigns_status_send_at", "campaigns", ["status", "send_at"])
    op.create_table(
        "marketing_templates",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("category", sa.String(length=40), nullable=False),
        sa.Column("topic", sa.String(length=100), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("variables", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_marketing_templates")),
    )
    op.create_index(
        "uq_messages_campaign_to_hash", "messages", ["campaign_id", "to_hash"], unique=True
    )
    op.create_index(
        "ix_messages_campaign_status", "messages", ["campaign_id", "status", "reason"]
    )


def downgrade() -> None:
    op.drop_index("ix_messages_campaign_status", table_name="messages")
    op.drop_index("uq_messages_campaign_to_hash", table_name="messages")
    op.drop_table("marketing_templates")
    op.drop_index("ix_campaigns_status_send_at", table_name="campaigns")
    op.drop_table("campaigns")
