"""campaign indexes: only rows of a campaign

``uq_messages_campaign_to_hash`` and ``ix_messages_campaign_status`` serve campaign
lookups only (every query names a campaign), but a single send (``campaign_id`` NULL) was
written into both: a B-tree insert at a random place of the first, and an entry of the
second moved on every status change (queued, sending, sent). Both now cover the rows of a
campaign only; uniqueness is unchanged, as NULL campaign ids never collided.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_IN_A_CAMPAIGN = "campaign_id IS NOT NULL"


def _create(partial: bool) -> None:
    where = sa.text(_IN_A_CAMPAIGN) if partial else None
    op.create_index("uq_messages_campaign_to_hash", "messages", ["campaign_id", "to_hash"],
                    unique=True, sqlite_where=where, postgresql_where=where)
    op.create_index("ix_messages_campaign_status", "messages",
                    ["campaign_id", "status", "reason"], sqlite_where=where,
                    postgresql_where=where)


def _drop() -> None:
    op.drop_index("uq_messages_campaign_to_hash", table_name="messages")
    op.drop_index("ix_messages_campaign_status", table_name="messages")


def upgrade() -> None:
    """Rebuild both indexes over campaign rows only."""
    _drop()
    _create(partial=True)


def downgrade() -> None:
    """Rebuild them over every row, as before."""
    _drop()
    _create(partial=False)
