"""A runtime for unit tests of the core: the migrated test database, no Redis, no SMTP.

The queue is an in-memory :class:`ListEnqueuer`, so what a unit hands to the workers can be
read back; the database is the session's real one (SQLite, or PostgreSQL with
``MAILER_TEST_DB=postgresql``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from mailer.config import Settings
from mailer.runtime import Runtime
from mailer.sending.queue import ListEnqueuer
from mailer.store.status import MessageStatus
from tests.conftest import base_env


def unit_runtime(db_url: str, **extra: str) -> Runtime:
    """A runtime on ``db_url`` whose queue is a :class:`ListEnqueuer`."""
    # Port 9 (discard) on loopback: nothing here may connect to Redis or SMTP.
    env = base_env(db_url, "redis://127.0.0.1:9/0", 9, **extra)
    return Runtime.from_settings(Settings.from_environ(env), ListEnqueuer())


def message_row(rt: Runtime, status: MessageStatus, now: datetime, **extra: Any) -> dict[str, Any]:
    """An outbox row as acceptance writes it, for a fresh address."""
    row_id, header = rt.new_message_id()
    row: dict[str, Any] = {
        "id": row_id, "api_key_id": 0, "category": "registration_confirmation",
        "template": "registration_confirmation", "topic": None, "recipient_id": None,
        "to_email": "unit@example.org", "to_name": None, "to_hash": uuid.uuid4().hex * 2,
        "data": {}, "status": status, "reason": None, "attempts": 0,
        "message_id_header": header, "created_at": now, "updated_at": now, "send_at": None,
    }
    row.update(extra)
    return row
