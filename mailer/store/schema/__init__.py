"""Database tables (SQLAlchemy Core); Alembic migrations create them, never ``create_all``.

One module per family of tables, all on the one :data:`metadata`. Every table is
re-exported here, so callers write ``from mailer.store.schema import messages`` whatever
module defines it, and importing this package puts every table on ``metadata`` (which
string foreign keys across families, such as ``messages.recipient_id``, and Alembic's env
rely on).
"""

from __future__ import annotations

from mailer.store.schema.api import api_keys, idempotency_keys
from mailer.store.schema.base import UtcDateTime, metadata
from mailer.store.schema.consent import (
    consent_events,
    consent_requests,
    policy_versions,
    recipients,
    suppressions,
    topics,
)
from mailer.store.schema.events import (
    outbound_deliveries,
    outbound_delivery_counts,
    outbound_events,
    webhook_endpoints,
)
from mailer.store.schema.marketing import campaigns, marketing_templates
from mailer.store.schema.reports import (
    bounce_reports,
    seen_tokens,
    sns_subscriptions,
    soft_bounces,
    unrecognised_reports,
    webhook_events,
)
from mailer.store.schema.sending import message_events, messages

__all__ = [
    "UtcDateTime",
    "api_keys",
    "bounce_reports",
    "campaigns",
    "consent_events",
    "consent_requests",
    "idempotency_keys",
    "marketing_templates",
    "message_events",
    "messages",
    "metadata",
    "outbound_deliveries",
    "outbound_delivery_counts",
    "outbound_events",
    "policy_versions",
    "recipients",
    "seen_tokens",
    "sns_subscriptions",
    "soft_bounces",
    "suppressions",
    "topics",
    "unrecognised_reports",
    "webhook_endpoints",
    "webhook_events",
]
