"""JSON views of stored rows, shared by the HTTP API and the recipient export."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from mailer.errors import InvalidAddress
from mailer.runtime import Runtime
from mailer.store.recipients import Address, get_recipient, ledger, preferences, suppression_rows
from suppression.addresses import InvalidAddressError
from suppression.consent import THIRD_PARTY_SHARING


def iso(value: datetime | None) -> str | None:
    """An aware UTC time as ISO 8601 with ``Z``; None stays None."""
    return value.isoformat().replace("+00:00", "Z") if value else None


def parse_address(rt: Runtime, raw: str) -> Address:
    """Validate a caller's address; :class:`InvalidAddress` (422) when it does not."""
    try:
        return rt.address(raw)
    except InvalidAddressError as exc:
        raise InvalidAddress(f"invalid address: {exc}") from None


def profile(row: Any) -> dict[str, Any]:
    """The profile fields of a recipient row."""
    return {
        "external_id": row.external_id, "email": row.email, "name": row.name,
        "locale": row.locale, "attributes": row.attributes or {},
        "account_active": bool(row.account_active),
        "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
    }


def recipient_view(conn: Connection, external_id: str) -> tuple[Any, dict[str, Any]]:
    """The profile row, and what ``GET /v1/recipients/{id}`` shows of it.

    Preferences per topic and third-party sharing (from the ledger, latest wins), every
    suppression of the address, and the full consent ledger.
    """
    row = get_recipient(conn, external_id)
    prefs = preferences(conn, row.id)
    sharing = prefs.pop(THIRD_PARTY_SHARING)
    return row, {
        "preferences": prefs,
        "third_party_sharing": sharing,
        "suppressions": [
            {"scope": s.scope, "reason": s.reason, "source": s.source,
             "created_at": iso(s.created_at), "expires_at": iso(s.expires_at)}
            for s in suppression_rows(conn, row.email_hash)
        ],
        "consents": [
            {"id": e.id, "topic": e.topic, "granted": bool(e.granted), "source": e.source,
             "policy_version": e.policy_version, "occurred_at": iso(e.occurred_at),
             "recorded_at": iso(e.recorded_at), "evidence": e.evidence}
            for e in ledger(conn, row.id)
        ],
    }
