"""header excerpts of reports the reader did not recognise, for an operator to read

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "unrecognised_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("reader", sa.String(length=40), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("structure", sa.String(length=500), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unrecognised_reports")),
    )
    op.create_index("ix_unrecognised_reports_received_at", "unrecognised_reports",
                    ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_unrecognised_reports_received_at", table_name="unrecognised_reports")
    op.drop_table("unrecognised_reports")
