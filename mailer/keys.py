"""API keys: 256-bit random secrets with a public prefix, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, bindparam, insert, select, update

from mailer.errors import NotFound, ValidationFailed
from mailer.store.schema import api_keys
from mailer.times import iso

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

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


# Every API request runs this query: built once (building and keying it cost ~200 us).
_BY_PREFIX = select(api_keys.c.id, api_keys.c.name, api_keys.c.key_hash, api_keys.c.scopes).where(
    api_keys.c.prefix == bindparam("prefix"), api_keys.c.revoked_at.is_(None)
)


def authenticate(conn: Connection, presented: str) -> ApiKey | None:
    """Return the key's identity, or None; the hash comparison is constant-time."""
    if not presented.startswith(_PREFIX) or presented.count("_") < 2:
        return None
    prefix = presented[len(_PREFIX):].split("_", 1)[0]
    row = conn.execute(_BY_PREFIX, {"prefix": prefix}).first()
    if row is None:
        # Still hash, so an unknown prefix costs the same as a wrong secret.
        hmac.compare_digest(_digest(presented), "0" * 64)
        return None
    if not hmac.compare_digest(_digest(presented), row.key_hash):
        return None
    return ApiKey(id=row.id, name=row.name, scopes=frozenset(row.scopes.split()))


@dataclass(frozen=True)
class KeyRecord:
    """What an operator may see of a key: never the key nor its hash (SPEC 7)."""

    id: int
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None

    def as_json(self, last_used_at: datetime | None) -> dict[str, Any]:
        """The key as ``GET /v1/keys`` lists it."""
        return {"id": self.id, "name": self.name, "scopes": list(self.scopes),
                "created_at": iso(self.created_at), "last_used_at": iso(last_used_at),
                "revoked_at": iso(self.revoked_at)}


_RECORD_COLUMNS = (api_keys.c.id, api_keys.c.name, api_keys.c.scopes, api_keys.c.created_at,
                   api_keys.c.revoked_at)


def _records(conn: Connection, *where: Any) -> list[KeyRecord]:
    rows = conn.execute(select(*_RECORD_COLUMNS).where(*where).order_by(api_keys.c.id))
    return [KeyRecord(id=r.id, name=r.name, scopes=tuple(r.scopes.split()),
                      created_at=r.created_at, revoked_at=r.revoked_at) for r in rows]


def list_keys(conn: Connection) -> list[KeyRecord]:
    """Every key, revoked ones included, oldest first."""
    return _records(conn)


def revoke_key(conn: Connection, key_id: int, now: datetime) -> KeyRecord:
    """Revoke a key (idempotent: a second revoke keeps the first time); NotFound if absent.

    :func:`authenticate` reads ``revoked_at`` on every request, so the key answers 401
    from the next request on, in every process.
    """
    conn.execute(update(api_keys)
                 .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                 .values(revoked_at=now))
    found = _records(conn, api_keys.c.id == key_id)
    if not found:
        raise NotFound(f"no API key {key_id}")
    return found[0]


#: The Redis hash of last-use times: field = key id, value = ISO 8601 UTC time.
LAST_USED_HASH = "mailer:api_keys:last_used"
#: A process records a key's use at most this often (seconds): ``last_used_at`` answers
#: "is this key still in use?" for rotation, which a minute's precision serves, and a
#: write per request would put a round trip on every call.
LAST_USED_INTERVAL = 60.0


class KeyUsage:
    """When each API key was last used, shared by every process through Redis.

    Kept in Redis rather than the database so that authenticating stays a read: a busy
    API would otherwise update the same ``api_keys`` row from every process. Each process
    writes a key's time at most once per :data:`LAST_USED_INTERVAL`; Redis being down
    costs the record, never the request.
    """

    def __init__(self, client: Redis[bytes], interval: float = LAST_USED_INTERVAL,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.interval = interval
        self._monotonic = monotonic
        self._written: dict[int, float] = {}
        self._lock = threading.Lock()

    def touch(self, key_id: int, now: datetime) -> bool:
        """Record that ``key_id`` was used at ``now``; True when this call wrote it."""
        moment = self._monotonic()
        with self._lock:
            last = self._written.get(key_id)
            if last is not None and moment - last < self.interval:
                return False
            self._written[key_id] = moment
        try:
            self.client.hset(LAST_USED_HASH, str(key_id), now.astimezone(UTC).isoformat())
        except Exception as exc:  # Redis down: the next use after the interval tries again
            log.warning("could not record API key use: %s", type(exc).__name__)
            return False
        return True

    def last_used(self, ids: Iterable[int]) -> dict[int, datetime]:
        """The recorded last use of each of ``ids`` that has one (empty if Redis is down)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        try:
            values = self.client.hmget(LAST_USED_HASH, [str(i) for i in wanted])
        except Exception as exc:
            log.warning("could not read API key use: %s", type(exc).__name__)
            return {}
        found: dict[int, datetime] = {}
        for key_id, raw in zip(wanted, values, strict=True):
            if raw:
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                found[key_id] = datetime.fromisoformat(text)
        return found
