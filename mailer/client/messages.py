"""The JSON bodies of ``POST /v1/messages`` and ``/batch`` (SPEC 7), with idempotency keys.

Every logical send gets an idempotency key before its first attempt, the caller's own or a
fresh UUID, and keeps it through the client's retries: the API remembers a key for 24 hours
and answers a repeat with the first response (SPEC 5), so a send whose answer was lost to a
timeout is retried without sending the mail twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

#: A recipient: an address, or ``{"email": ..., "name"?: ..., "external_id"?: ...}``.
Recipient = str | Mapping[str, Any]


def new_idempotency_key() -> str:
    """A fresh key, unique per logical send."""
    return str(uuid.uuid4())


def _instant(value: datetime | str) -> str:
    # The API wants an ISO 8601 instant with a zone; a naive datetime is sent as-is and the
    # API's 422 names the problem, rather than this client guessing a zone for it.
    return value.isoformat() if isinstance(value, datetime) else value


def message_body(
    template: str,
    to: Recipient,
    data: Mapping[str, Any] | None = None,
    *,
    topic: str | None = None,
    idempotency_key: str | None = None,
    send_at: datetime | str | None = None,
    locale: str | None = None,
) -> dict[str, Any]:
    """One message as the API takes it, always with an idempotency key."""
    body: dict[str, Any] = {
        "template": template,
        "to": to if isinstance(to, str) else dict(to),
        "idempotency_key": idempotency_key or new_idempotency_key(),
    }
    if data is not None:
        body["data"] = dict(data)
    if topic is not None:
        body["topic"] = topic
    if send_at is not None:
        body["send_at"] = _instant(send_at)
    if locale is not None:
        body["locale"] = locale  # SPEC 14: the message's locale picks the template version
    return body


def batch_body(messages: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The batch body: the caller's dicts copied, each given a key if it has none."""
    items = []
    for message in messages:
        item = dict(message)
        if not item.get("idempotency_key"):
            item["idempotency_key"] = new_idempotency_key()
        if isinstance(item.get("send_at"), datetime):
            item["send_at"] = _instant(item["send_at"])
        items.append(item)
    return {"messages": items}
