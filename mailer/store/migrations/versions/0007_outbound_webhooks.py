"""outbound event webhooks: endpoints and the event outbox (SPEC 13)

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Placeholder: filled in with the outbound webhook tables."""


def downgrade() -> None:
    """Placeholder: drops what upgrade creates."""
