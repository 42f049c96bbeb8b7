"""languages and privacy-policy versions (SPEC 14)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Placeholder: filled in with translations and policy versions."""


def downgrade() -> None:
    """Placeholder: drops what upgrade creates."""
