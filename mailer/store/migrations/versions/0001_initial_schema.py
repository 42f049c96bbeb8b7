"""initial schema, and the default topics (SPEC 3: created on first start)

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("api_key_id", "key", name="uq_idempotency_keys_key"),
    )
    op.create_table(
        "recipients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("email_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("locale", sa.String(length=35), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("account_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recipients")),
        sa.UniqueConstraint("external_id", name=op.f("uq_recipients_external_id")),
        # Never reuse an id: tokens in old mail name recipients by id (see schema.py).
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("recipients", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_recipients_email_hash"), ["email_hash"], unique=False)

    op.create_table(
        "suppressions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("email_hash", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_suppressions")),
        sa.UniqueConstraint("email_hash", "reason", name="uq_suppressions_hash_reason"),
    )
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_suppressions_email_hash"), ["email_hash"], unique=False
        )

    op.create_table(
        "topics",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("third_party", sa.Boolean(), nullable=False),
        sa.Column("double_opt_in", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_topics")),
    )
    op.create_table(
        "consent_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("recipient_id", sa.Integer(), nullable=True),
        sa.Column("email_hash", sa.String(length=64), nullable=False),
        sa.Column("topic", sa.String(length=100), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("policy_version", sa.String(length=40), nullable=False),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["recipient_id"],
            ["recipients.id"],
            name=op.f("fk_consent_events_recipient_id_recipients"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consent_events")),
    )
    with op.batch_alter_table("consent_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_consent_events_email_hash"), ["email_hash"], unique=False
        )
        batch_op.create_index(
            "ix_consent_events_recipient_topic", ["recipient_id", "topic"], unique=False
        )

    op.create_table(
        "messages",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("campaign_id", sa.String(length=32), nullable=True),
        sa.Column("category", sa.String(length=40), nullable=False),
        sa.Column("template", sa.String(length=100), nullable=False),
        sa.Column("topic", sa.String(length=100), nullable=True),
        sa.Column("recipient_id", sa.Integer(), nullable=True),
        sa.Column("to_email", sa.String(length=320), nullable=True),
        sa.Column("to_name", sa.String(length=200), nullable=True),
        sa.Column("to_hash", sa.String(length=64), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.String(length=40), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("message_id_header", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("send_at", sa.DateTime(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("smtp_code", sa.Integer(), nullable=True),
        sa.Column("smtp_response", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(
            ["recipient_id"],
            ["recipients.id"],
            name=op.f("fk_messages_recipient_id_recipients"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("message_id_header", name=op.f("uq_messages_message_id_header")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_messages_campaign_id"), ["campaign_id"], unique=False)
        batch_op.create_index("ix_messages_status_updated", ["status", "updated_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_messages_to_hash"), ["to_hash"], unique=False)
        batch_op.create_index(
            "ix_messages_to_hash_category", ["to_hash", "category", "created_at"], unique=False
        )

    op.create_table(
        "message_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_message_events_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_events")),
    )
    with op.batch_alter_table("message_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_message_events_message_id"), ["message_id"], unique=False
        )

    # Default topics. Marketing consent is never implied: creating a topic grants nothing.
    topics = sa.table(
        "topics",
        sa.column("name", sa.String),
        sa.column("title", sa.String),
        sa.column("description", sa.Text),
        sa.column("third_party", sa.Boolean),
        sa.column("double_opt_in", sa.Boolean),
        sa.column("created_at", sa.DateTime),
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    op.bulk_insert(
        topics,
        [
            {
                "name": "newsletter",
                "title": "Newsletter",
                "description": "Our regular newsletter with news and articles.",
                "third_party": False,
                "double_opt_in": False,
                "created_at": now,
            },
            {
                "name": "product_updates",
                "title": "Product updates",
                "description": "Announcements of new features and changes to our products.",
                "third_party": False,
                "double_opt_in": False,
                "created_at": now,
            },
            {
                "name": "partner_offers",
                "title": "Partner offers",
                "description": "Offers on behalf of selected partner companies.",
                "third_party": True,
                "double_opt_in": True,
                "created_at": now,
            },
        ],
    )


def downgrade() -> None:
    with op.batch_alter_table("message_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_message_events_message_id"))

    op.drop_table("message_events")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_to_hash_category")
        batch_op.drop_index(batch_op.f("ix_messages_to_hash"))
        batch_op.drop_index("ix_messages_status_updated")
        batch_op.drop_index(batch_op.f("ix_messages_campaign_id"))

    op.drop_table("messages")
    with op.batch_alter_table("consent_events", schema=None) as batch_op:
        batch_op.drop_index("ix_consent_events_recipient_topic")
        batch_op.drop_index(batch_op.f("ix_consent_events_email_hash"))

    op.drop_table("consent_events")
    op.drop_table("topics")
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_suppressions_email_hash"))

    op.drop_table("suppressions")
    with op.batch_alter_table("recipients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recipients_email_hash"))

    op.drop_table("recipients")
    op.drop_table("idempotency_keys")
    op.drop_table("api_keys")
