"""Privacy-policy versions: which one is in force when, and how many consents each holds.

SPEC 14: a registered version takes effect at its ``effective_at``; the version in force at
a moment is the one with the latest ``effective_at`` not after it, and
``MAILER_POLICY_VERSION`` when none has passed yet. Every consent event records the version
in force at its ``occurred_at`` (:func:`mailer.store.recipients.record_consent`), so the
ledger shows which wording of the policy each "yes" and "no" was given under. Registering
a version writes only its own row: it never touches the ledger or the suppressions, so
nobody's preferences change (SPEC 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from mailer.errors import Conflict
from mailer.store.schema import consent_events, policy_versions


@dataclass(frozen=True)
class PolicyVersion:
    """One line of ``GET /v1/policy-versions``."""

    version: str
    effective_at: datetime | None
    active_consents: int
    summary_url: str | None = None
    campaign_id: str | None = None


def version_in_force(conn: Connection, at: datetime, configured: str) -> str:
    """The version in force at ``at``: the newest registered one that has taken effect."""
    found = conn.execute(
        select(policy_versions.c.version)
        .where(policy_versions.c.effective_at <= at)
        .order_by(policy_versions.c.effective_at.desc(), policy_versions.c.id.desc())
        .limit(1)
    ).scalar()
    return str(found) if found is not None else configured


def register(conn: Connection, version: str, effective_at: datetime, summary_url: str | None,
             api_key_id: int | None, now: datetime) -> Row[Any]:
    """Insert a version; 409 ``policy_version_exists`` when that name is registered."""
    try:
        with conn.begin_nested():
            conn.execute(insert(policy_versions).values(
                version=version, effective_at=effective_at, summary_url=summary_url,
                api_key_id=api_key_id, created_at=now))
    except IntegrityError:
        raise Conflict(f"policy version {version!r} is already registered",
                       {"version": version}, code="policy_version_exists") from None
    row = conn.execute(select(policy_versions)
                       .where(policy_versions.c.version == version)).one()
    return row


def set_campaign(conn: Connection, version: str, campaign_id: str) -> None:
    """Remember the notification campaign of a version."""
    conn.execute(update(policy_versions).where(policy_versions.c.version == version)
                 .values(campaign_id=campaign_id))


def active_consents(conn: Connection) -> dict[str, int]:
    """Per policy version, the active grants whose deciding event was recorded under it.

    The deciding event of a (recipient, topic) is the ledger's current one (SPEC 3): the
    newest ``occurred_at``, a revoke on a tie, the first recorded among equal grants.
    Pseudonymised rows of erased people decide nothing for anybody.
    """
    events = consent_events.c
    ranked = select(
        events.policy_version, events.granted,
        func.row_number().over(
            partition_by=(events.recipient_id, events.topic),
            order_by=(events.occurred_at.desc(), events.granted.asc(), events.id.asc()),
        ).label("rank"),
    ).where(events.recipient_id.is_not(None)).subquery()
    rows = conn.execute(
        select(ranked.c.policy_version, func.count())
        .where(ranked.c.rank == 1, ranked.c.granted.is_(True))
        .group_by(ranked.c.policy_version))
    return {str(version): int(count) for version, count in rows}


def listing(conn: Connection, configured: str) -> list[PolicyVersion]:
    """Every version, oldest ``effective_at`` first; the configured one first (with no
    ``effective_at``) when it is not registered itself."""
    counts = active_consents(conn)
    rows = list(conn.execute(select(policy_versions).order_by(
        policy_versions.c.effective_at, policy_versions.c.id)))
    items = [PolicyVersion(r.version, r.effective_at, counts.get(r.version, 0), r.summary_url,
                           r.campaign_id) for r in rows]
    if all(r.version != configured for r in rows):
        items.insert(0, PolicyVersion(configured, None, counts.get(configured, 0)))
    return items
