"""bounce and complaint reports with their result (applied, unmatched, unrecognised)

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bounce_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("result", sa.String(length=20), nullable=False),
        sa.Column("event_type", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=True),
        sa.Column("email_hash", sa.String(length=64), nullable=True),
        sa.Column("message_id", sa.String(length=32), nullable=True),
        sa.Column("event_key", sa.String(length=64), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bounce_reports")),
    )
    op.create_index("ix_bounce_reports_source_result", "bounce_reports", ["source", "result"])
    op.create_index("ix_bounce_reports_source_event", "bounce_reports", ["source", "event_key"])


def downgrade() -> None:
    op.drop_index("ix_bounce_reports_source_event", table_name="bounce_reports")
    op.drop_index("ix_bounce_reports_source_result", table_name="bounce_reports")
    op.drop_table("bounce_reports")
