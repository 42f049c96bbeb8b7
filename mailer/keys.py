"""API keys: 256-bit random secrets with a public prefix, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, insert, select

from mailer.errors import ValidationFailed
from mailer.store.schema import api_keys

#: Every scope a key may hold (SPEC 7).
SCOPES = frozenset({"messages:transactional", "messages:legal", "marketing", "recipients", "admin"})

_PREFIX = "mk_"


@dataclass(frozen=True)
class ApiKey:
    """An authenticated caller: the key's row id, name and scopes."""

    id: int
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """True when the key holds ``scope`` or ``admin``."""
        return "admin" in self.scopes or scope in self.scopes


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(conn: Connection, name: str, scopes: Iterable[str]) -> str:
    """Store a new key and return it; this is the only time the secret exists in clear."""
    wanted = frozenset(scopes)
    unknown = wanted - SCOPES
    if not wanted or unknown:
        raise ValidationFailed(
            f"unknown or missing scope; choose from {', '.join(sorted(SCOPES))}",
            details={"unknown": sorted(unknown)},
        )
    prefix = secrets.token_hex(6)
    key = f"{_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    conn.execute(
        insert(api_keys).values(
            name=name,
            prefix=prefix,
            key_hash=_digest(key),
            scopes=" ".join(sorted(wanted)),
            created_at=datetime.now(UTC),
        )
    )
    return key


def authenticate(conn: Connection, presented: str) -> ApiKey | None:
    """Return the key's identity, or None; the hash comparison is constant-time."""
    if not presented.startswith(_PREFIX) or presented.count("_") < 2:
        return None
    prefix = presented[len(_PREFIX):].split("_", 1)[0]
    row = conn.execute(
        select(api_keys.c.id, api_keys.c.name, api_keys.c.key_hash, api_keys.c.scopes).where(
            api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        # Still hash, so an unknown prefix costs the same as a wrong secret.
        hmac.compare_digest(_digest(presented), "0" * 64)
        return None
    if not hmac.compare_digest(_digest(presented), row.key_hash):
        return None
    return ApiKey(id=row.id, name=row.name, scopes=frozenset(row.scopes.split()))
