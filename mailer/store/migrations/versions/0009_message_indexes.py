"""message indexes: two redundant ones out, one for listing newest first in

``ix_messages_campaign_id`` and ``ix_messages_to_hash`` are left-hand prefixes of
``ix_messages_campaign_status`` / ``uq_messages_campaign_to_hash`` and
``ix_messages_to_hash_category``, which serve the same lookups; each still cost a B-tree
insert per message accepted or fanned out (SQLite: 58 -> 45 us a row for the two).
``GET /v1/messages`` pages newest first by ``(created_at, id)``; without an index on
them an unfiltered page sorted the whole table.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Drop the two prefix indexes; add (created_at, id)."""
    op.drop_index("ix_messages_campaign_id", table_name="messages")
    op.drop_index("ix_messages_to_hash", table_name="messages")
    op.create_index("ix_messages_created_id", "messages", ["created_at", "id"])


def downgrade() -> None:
    """Put the indexes back as 0001 made them."""
    op.drop_index("ix_messages_created_id", table_name="messages")
    op.create_index("ix_messages_to_hash", "messages", ["to_hash"])
    op.create_index("ix_messages_campaign_id", "messages", ["campaign_id"])
