"""Recipient profiles, the consent ledger and the suppression list, as stored rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update
from sqlalchemy.exc import IntegrityError

from mailer.errors import Conflict, NotFound, ValidationFailed
from mailer.store.policy_versions import version_in_force
from mailer.store.schema import consent_events, recipients, suppressions, topics
from suppression.consent import SOURCES, THIRD_PARTY_SHARING, ConsentEvent, current, grant_conflicts

#: Suppression reasons only an admin may lift (SPEC 4).
ADMIN_ONLY_REASONS = frozenset({"complaint", "hard_bounce", "manual", "erased"})
SUPPRESSION_REASONS = frozenset(
    {"hard_bounce", "soft_bounce_limit", "complaint", "unsubscribed", "manual", "erased"}
)


@dataclass(frozen=True)
class Address:
    """A validated address: normalised form and keyed hash."""

    email: str
    hash: str


def get_recipient(conn: Connection, external_id: str) -> Row[Any]:
    """The profile row, or :class:`NotFound`."""
    row = conn.execute(select(recipients).where(recipients.c.external_id == external_id)).first()
    if row is None:
        raise NotFound(f"no recipient {external_id!r}")
    return row


def recipient_by_id(conn: Connection, recipient_id: int) -> Row[Any] | None:
    """The profile row a signed link names, or None once it has been erased."""
    return conn.execute(select(recipients).where(recipients.c.id == recipient_id)).first()


def find_by_hash(conn: Connection, email_hash: str) -> Row[Any] | None:
    """The most recently updated profile with this address, if any."""
    return conn.execute(
        select(recipients)
        .where(recipients.c.email_hash == email_hash)
        .order_by(recipients.c.updated_at.desc())
        .limit(1)
    ).first()


def upsert_recipient(
    conn: Connection, external_id: str, address: Address, fields: Mapping[str, Any], now: datetime
) -> tuple[Row[Any], bool]:
    """Create or update a profile; return it and whether it was created."""
    values = {
        "email": address.email,
        "email_hash": address.hash,
        "name": fields.get("name"),
        "locale": fields.get("locale"),
        "attributes": dict(fields.get("attributes") or {}),
        "account_active": bool(fields.get("account_active", True)),
        "updated_at": now,
    }
    existing = conn.execute(
        select(recipients.c.id).where(recipients.c.external_id == external_id)
    ).first()
    if existing is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(recipients).values(external_id=external_id, created_at=now, **values)
                )
            return get_recipient(conn, external_id), True
        except IntegrityError:
            pass  # a concurrent PUT created it first: fall through to update
    conn.execute(update(recipients).where(recipients.c.external_id == external_id).values(**values))
    return get_recipient(conn, external_id), False


def topic_row(conn: Connection, name: str) -> Row[Any]:
    """The topic, or a 422 naming it (a consent for an unknown topic is a caller error)."""
    row = conn.execute(select(topics).where(topics.c.name == name)).first()
    if row is None:
        raise ValidationFailed(f"unknown topic {name!r}", code="unknown_topic")
    return row


def ledger(conn: Connection, recipient_id: int) -> list[Row[Any]]:
    """Every consent event of a recipient, oldest first."""
    return list(
        conn.execute(
            select(consent_events)
            .where(consent_events.c.recipient_id == recipient_id)
            .order_by(consent_events.c.occurred_at, consent_events.c.id)
        )
    )


def consent_history(conn: Connection, recipient_id: int, topic: str) -> list[ConsentEvent]:
    """The ledger of one topic as policy values."""
    rows = conn.execute(
        select(
            consent_events.c.topic, consent_events.c.granted,
            consent_events.c.occurred_at, consent_events.c.source,
        ).where(consent_events.c.recipient_id == recipient_id, consent_events.c.topic == topic)
    )
    return [ConsentEvent(r.topic, bool(r.granted), r.occurred_at, r.source) for r in rows]


def refuse_silent_resubscription(
    conn: Connection, recipient_id: int, topic: str, source: str, *, has_evidence: bool
) -> None:
    """409 ``consent_conflict`` when this grant would undo the person's own revoke.

    SPEC 3, "No silent re-subscription": once someone has said no, only their own action
    (a signup form with evidence, the preference centre, double opt-in) says yes again.
    """
    history = consent_history(conn, recipient_id, topic)
    if grant_conflicts(history, topic, source, has_evidence=has_evidence):
        raise Conflict(
            "this person revoked consent for the topic; only their own action can "
            "grant it again",
            code="consent_conflict",
        )


def record_consent(
    conn: Connection,
    recipient: Row[Any],
    topic: str,
    granted: bool,
    source: str,
    policy_version: str,
    occurred_at: datetime,
    now: datetime,
    evidence: Mapping[str, Any] | None = None,
    *,
    explicit_version: bool = False,
) -> int:
    """Append a consent event after checking the no-silent-re-subscription rule (SPEC 3).

    The event records the privacy-policy version in force at ``occurred_at`` (SPEC 14);
    ``policy_version`` is the configured one, used while no registered version has taken
    effect, unless ``explicit_version`` says the caller named it (SPEC 7's
    ``policy_version`` field).
    """
    if source not in SOURCES:
        raise ValidationFailed(
            f"unknown consent source; choose from {', '.join(sorted(SOURCES))}",
            code="invalid_source",
        )
    if topic != THIRD_PARTY_SHARING:
        topic_row(conn, topic)
    if granted:
        refuse_silent_resubscription(conn, recipient.id, topic, source,
                                     has_evidence=bool(evidence))
    if not explicit_version:
        policy_version = version_in_force(conn, occurred_at, policy_version)
    result = conn.execute(
        insert(consent_events).values(
            recipient_id=recipient.id,
            email_hash=recipient.email_hash,
            topic=topic,
            granted=granted,
            source=source,
            policy_version=policy_version,
            occurred_at=occurred_at,
            recorded_at=now,
            evidence=dict(evidence) if evidence else None,
        )
    )
    # A later grant by the person's own action lifts an "unsubscribed from all" block for
    # that topic only (SPEC 4); the policy sees that from the suppression's created_at, so
    # the suppression row stays as evidence.
    return int(result.inserted_primary_key[0])  # type: ignore[index]


def preferences(conn: Connection, recipient_id: int) -> dict[str, dict[str, Any]]:
    """Current state per topic and of third-party sharing, from the ledger (latest wins)."""
    events = [
        ConsentEvent(r.topic, bool(r.granted), r.occurred_at, r.source)
        for r in ledger(conn, recipient_id)
    ]
    names = [r.name for r in conn.execute(select(topics.c.name).order_by(topics.c.name))]
    out: dict[str, dict[str, Any]] = {}
    for name in [*names, THIRD_PARTY_SHARING]:
        event = current(events, name)
        out[name] = {
            "subscribed": bool(event and event.granted),
            "since": event.occurred_at.isoformat() if event else None,
            "source": event.source if event else None,
        }
    return out


def add_suppression(
    conn: Connection,
    address: Address | None,
    email_hash: str,
    scope: str,
    reason: str,
    source: str,
    now: datetime,
    expires_at: datetime | None = None,
) -> bool:
    """Insert a suppression unless one with that reason exists; return True if added."""
    if reason not in SUPPRESSION_REASONS or scope not in ("all", "marketing"):
        raise ValidationFailed("unknown suppression reason or scope", code="invalid_suppression")
    exists = conn.execute(
        select(suppressions.c.id).where(
            suppressions.c.email_hash == email_hash, suppressions.c.reason == reason
        )
    ).first()
    if exists is not None:
        if expires_at is not None:
            conn.execute(
                update(suppressions)
                .where(suppressions.c.id == exists.id)
                .values(expires_at=expires_at, created_at=now)
            )
        return False
    try:
        with conn.begin_nested():
            conn.execute(
                insert(suppressions).values(
                    email=address.email if address else None,
                    email_hash=email_hash,
                    scope=scope,
                    reason=reason,
                    source=source[:200],
                    created_at=now,
                    expires_at=expires_at,
                )
            )
    except IntegrityError:
        return False  # a concurrent writer added the same entry: one row is what we want
    return True


def suppression_rows(conn: Connection, email_hash: str) -> list[Row[Any]]:
    """Every suppression of one address."""
    return list(conn.execute(select(suppressions).where(suppressions.c.email_hash == email_hash)))
