"""languages and privacy-policy versions (SPEC 14)

Translations of topics and stored templates, a message's own ``locale``, campaigns of
service alerts (a category, and no topic), and the registered policy versions.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

#: German and Russian for the topics 0001 creates, given only while a topic still has the
#: shipped English title and description (an operator's own wording is left alone).
SHIPPED_TOPICS = {
    "newsletter": (
        "Newsletter", "Our regular newsletter with news and articles.",
        {"de": {"title": "Newsletter",
                "description": "Unser regelmäßiger Newsletter mit Neuigkeiten und Artikeln."},
         "ru": {"title": "Новостная рассылка",
                "description": "Наша регулярная рассылка с новостями и статьями."}}),  # noqa: RUF001
    "product_updates": (
        "Product updates", "Announcements of new features and changes to our products.",
        {"de": {"title": "Produktneuheiten",
                "description": "Ankündigungen neuer Funktionen und Änderungen an unseren "
                               "Produkten."},
         "ru": {"title": "Обновления продуктов",
                "description": "Объявления о новых функциях и изменениях в наших "  # noqa: RUF001
                               "продуктах."}}),
    "partner_offers": (
        "Partner offers", "Offers on behalf of selected partner companies.",
        {"de": {"title": "Partnerangebote",
                "description": "Angebote im Auftrag ausgewählter Partnerunternehmen."},
         "ru": {"title": "Предложения партнёров",
                "description": "Предложения от имени избранных компаний-партнёров."}}),
}

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the translation columns, campaign categories and the policy_versions table."""
    op.add_column("topics", sa.Column("translations", sa.JSON(), nullable=True))
    op.add_column("marketing_templates", sa.Column("translations", sa.JSON(), nullable=True))
    op.add_column("messages", sa.Column("locale", sa.String(length=35), nullable=True))
    # SQLite cannot drop NOT NULL in place: batch mode copies the table (it is small).
    with op.batch_alter_table("campaigns") as batch:
        batch.add_column(sa.Column("category", sa.String(length=40), nullable=False,
                                   server_default="promotion"))
        batch.alter_column("topic", existing_type=sa.String(length=100), nullable=True)
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=False),
        sa.Column("effective_at", sa.DateTime(), nullable=False),
        sa.Column("summary_url", sa.String(length=2000), nullable=True),
        sa.Column("campaign_id", sa.String(length=32), nullable=True),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_policy_versions_version")),
    )
    op.create_index("ix_policy_versions_effective_at", "policy_versions", ["effective_at"])
    topics = sa.table("topics", sa.column("name", sa.String), sa.column("title", sa.String),
                      sa.column("description", sa.Text), sa.column("translations", sa.JSON))
    for name, (title, description, translations) in SHIPPED_TOPICS.items():
        op.execute(topics.update()
                   .where(topics.c.name == name, topics.c.title == title,
                          topics.c.description == description)
                   .values(translations=translations))


def downgrade() -> None:
    """Drop what upgrade created (service-alert campaigns go with their category)."""
    op.drop_index("ix_policy_versions_effective_at", table_name="policy_versions")
    op.drop_table("policy_versions")
    op.execute("DELETE FROM campaigns WHERE topic IS NULL")
    with op.batch_alter_table("campaigns") as batch:
        batch.alter_column("topic", existing_type=sa.String(length=100), nullable=False)
        batch.drop_column("category")
    op.drop_column("messages", "locale")
    op.drop_column("marketing_templates", "translations")
    op.drop_column("topics", "translations")
