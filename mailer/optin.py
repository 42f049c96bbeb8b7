"""Consent changes by the recipient's own hand: double opt-in, unsubscribe, preference centre.

Everything here is reached from a signed link that was mailed to the address, so the
person acting has shown control of the mailbox. Each function writes its ledger events
(and, for "unsubscribe from all marketing", the suppression) in one transaction that has
committed when it returns: the public pages answer only after that (SPEC 4).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update

from mailer.accept import Acceptor, SendRequest
from mailer.errors import Conflict
from mailer.keys import ApiKey
from mailer.recipients import (
    add_suppression,
    consent_history,
    get_recipient,
    preferences,
    record_consent,
    suppression_rows,
    topic_row,
)
from mailer.runtime import Runtime
from mailer.schema import consent_requests, messages, recipients, topics
from suppression.consent import SELF_SERVICE_SOURCES, THIRD_PARTY_SHARING, grant_conflicts

log = logging.getLogger(__name__)

#: Grants from these sources wait for confirmation on a ``double_opt_in`` topic: the
#: person said yes on a form, but nothing yet shows that the mailbox is theirs. Operator
#: sources (``import``, ``api``, ``admin``) are taken as already confirmed elsewhere.
PENDING_SOURCES = SELF_SERVICE_SOURCES - {"double_opt_in"}

#: At most this many confirmation mails per address per :data:`CONFIRMATION_WINDOW`:
#: enough to resend a lost one, too few to mail-bomb someone by typing their address
#: into a signup form over and over (SPEC 3).
DEFAULT_CONFIRMATION_LIMIT = 3
#: The rolling window of :data:`DEFAULT_CONFIRMATION_LIMIT`.
CONFIRMATION_WINDOW = timedelta(hours=24)
#: A pending request older than this can no longer be confirmed; the person asks again.
DEFAULT_REQUEST_TTL = timedelta(days=7)
#: The template of the confirmation mail (category ``registration_confirmation``, not
#: counted by the one-time rule: see :mod:`mailer.states`).
CONFIRMATION_TEMPLATE = "consent_confirmation"
#: The internal caller that sends system mail through the normal acceptance path.
SYSTEM_KEY = ApiKey(id=0, name="system", scopes=frozenset({"admin"}))

#: Suppression reasons the preference centre explains instead of hiding: marketing stays
#: blocked whatever is ticked until an admin lifts them (SPEC 4).
_HARD_BLOCKS = frozenset({"complaint", "hard_bounce", "manual", "erased", "soft_bounce_limit"})


@dataclass(frozen=True)
class PendingGrant:
    """A grant waiting for confirmation, and what became of its confirmation mail."""

    request_id: int
    #: ``queued`` (mail accepted), ``rate_limited``, ``suppressed`` or ``failed``.
    confirmation: str
    message_id: str | None = None


@dataclass(frozen=True)
class TopicChoice:
    """One line of the preference centre."""

    name: str
    title: str
    description: str
    third_party: bool
    subscribed: bool


@dataclass(frozen=True)
class PreferenceView:
    """What the preference centre shows for one recipient."""

    topics: tuple[TopicChoice, ...]
    third_party_sharing: bool
    #: Reasons that block all marketing regardless of the topic choices (admin-only lifts).
    blocked_by: tuple[str, ...]


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _recipient_by_id(conn: Connection, recipient_id: int) -> Row[Any] | None:
    return conn.execute(select(recipients).where(recipients.c.id == recipient_id)).first()


class DoubleOptIn:
    """Pending grants for ``double_opt_in`` topics, their mails and their confirmation."""

    def __init__(
        self,
        runtime: Runtime,
        limit: int = DEFAULT_CONFIRMATION_LIMIT,
        window: timedelta = CONFIRMATION_WINDOW,
        ttl: timedelta = DEFAULT_REQUEST_TTL,
    ) -> None:
        self.rt = runtime
        self.limit = limit
        self.window = window
        self.ttl = ttl

    def request(
        self,
        external_id: str,
        topic: str,
        source: str,
        policy_version: str,
        occurred_at: datetime,
        evidence: Mapping[str, Any] | None = None,
    ) -> PendingGrant | None:
        """Start a double opt-in, or return None when the grant may go to the ledger now.

        None means: the source is not a self-service one, the topic does not ask for
        confirmation, or the topic is already granted (another grant changes nothing).
        """
        if source not in PENDING_SOURCES:
            return None
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            recipient = get_recipient(conn, external_id)
            if topic == THIRD_PARTY_SHARING or not topic_row(conn, topic).double_opt_in:
                return None
            history = consent_history(conn, recipient.id, topic)
            if grant_conflicts(history, topic, source, has_evidence=bool(evidence)):
                raise Conflict(
                    "this person revoked consent for the topic; only their own action can "
                    "grant it again",
                    code="consent_conflict",
                )
            prefs = preferences(conn, recipient.id)
            if prefs.get(topic, {}).get("subscribed"):
                return None
            request_id = int(conn.execute(
                insert(consent_requests).values(
                    recipient_id=recipient.id, topic=topic, source=source,
                    policy_version=policy_version,
                    evidence=dict(evidence) if evidence else None,
                    requested_at=occurred_at, recorded_at=now,
                )
            ).inserted_primary_key[0])  # type: ignore[index]
            sent = self._recent_mails(conn, recipient.email_hash, now)
            title = topic_row(conn, topic).title
        if sent >= self.limit:
            # The request stays pending: a link from an earlier mail still confirms it.
            return PendingGrant(request_id, "rate_limited")
        return self._mail(request_id, recipient, topic, title)

    def _recent_mails(self, conn: Connection, email_hash: str, now: datetime) -> int:
        """Confirmation mails to this address in the window (the messages table is the truth)."""
        return int(conn.execute(
            select(func.count()).select_from(messages).where(
                messages.c.template == CONFIRMATION_TEMPLATE,
                messages.c.to_hash == email_hash,
                messages.c.created_at > now - self.window,
                messages.c.status.not_in(("suppressed", "cancelled")),
            )
        ).scalar_one())

    def _mail(self, request_id: int, recipient: Row[Any], topic: str, title: str) -> PendingGrant:
        token = self.rt.signer.sign("c", recipient.id, topic)
        data: dict[str, Any] = {"confirm_url": self.rt.url(f"/confirm/{token}"),
                                "topic_title": title}
        if recipient.name:
            data["name"] = recipient.name
        [result] = Acceptor(self.rt).accept(SYSTEM_KEY, [SendRequest(
            template=CONFIRMATION_TEMPLATE, email=recipient.email,
            external_id=recipient.external_id, name=recipient.name, data=data,
        )])
        if "error" in result:
            log.warning("double opt-in mail for request %s not accepted: %s",
                        request_id, result["error"].get("code"))
            return PendingGrant(request_id, "failed")
        with self.rt.engine.begin() as conn:
            conn.execute(update(consent_requests)
                         .where(consent_requests.c.id == request_id)
                         .values(message_id=result["id"]))
        status = "suppressed" if result["status"] == "suppressed" else "queued"
        return PendingGrant(request_id, status, result["id"])

    def state(self, recipient_id: int, topic: str) -> str:
        """``pending`` (a request can be confirmed), ``confirmed`` (done), or ``none``."""
        now = self.rt.clock()
        with self.rt.engine.connect() as conn:
            rows = list(conn.execute(
                select(consent_requests.c.confirmed_at, consent_requests.c.recorded_at).where(
                    consent_requests.c.recipient_id == recipient_id,
                    consent_requests.c.topic == topic,
                )
            ))
        if any(r.confirmed_at is None and r.recorded_at > now - self.ttl for r in rows):
            return "pending"
        return "confirmed" if any(r.confirmed_at is not None for r in rows) else "none"

    def confirm(
        self, recipient_id: int, topic: str, evidence: Mapping[str, Any] | None = None
    ) -> str:
        """Turn pending requests into one ledger grant; ``confirmed``, ``already`` or ``none``."""
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            recipient = _recipient_by_id(conn, recipient_id)
            if recipient is None:
                return "none"
            pending = list(conn.execute(
                select(consent_requests).where(
                    consent_requests.c.recipient_id == recipient_id,
                    consent_requests.c.topic == topic,
                    consent_requests.c.confirmed_at.is_(None),
                    consent_requests.c.recorded_at > now - self.ttl,
                ).order_by(consent_requests.c.recorded_at, consent_requests.c.id)
            ))
            ids = [r.id for r in pending]
            claimed = 0
            if ids:
                # Compare-and-set: of two clicks at once, only one writes the grant.
                claimed = int(conn.execute(
                    update(consent_requests)
                    .where(consent_requests.c.id.in_(ids),
                           consent_requests.c.confirmed_at.is_(None))
                    .values(confirmed_at=now)
                ).rowcount or 0)
            if not claimed:
                done = conn.execute(select(consent_requests.c.id).where(
                    consent_requests.c.recipient_id == recipient_id,
                    consent_requests.c.topic == topic,
                    consent_requests.c.confirmed_at.is_not(None),
                )).first()
                return "already" if done is not None else "none"
            latest = pending[-1]
            proof: dict[str, Any] = {
                "request_id": latest.id,
                "requested_at": _iso(latest.requested_at),
                "request_source": latest.source,
                "request_evidence": latest.evidence,
                **dict(evidence or {}),
            }
            record_consent(conn, recipient, topic, True, "double_opt_in",
                           latest.policy_version, now, now, proof)
        return "confirmed"


class SelfService:
    """Unsubscribe and preference-centre changes, written before the page answers."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def recipient_exists(self, recipient_id: int) -> bool:
        """Whether the profile a token names still exists (erasure removes it)."""
        with self.rt.engine.connect() as conn:
            return _recipient_by_id(conn, recipient_id) is not None

    def topic_title(self, name: str) -> str | None:
        """The title of a topic, or None when there is no such topic."""
        with self.rt.engine.connect() as conn:
            row = conn.execute(select(topics.c.title).where(topics.c.name == name)).first()
        return None if row is None else str(row.title)

    def unsubscribe(self, recipient_id: int, topic: str, source: str) -> bool:
        """Revoke one topic unless it is revoked already; return whether anything changed.

        An unknown topic (renamed since the mail went out) falls back to everything: the
        person clearly wants less mail, and guessing narrower would ignore their choice.
        """
        if self.topic_title(topic) is None:
            return self.unsubscribe_all(recipient_id, source) > 0
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            recipient = _recipient_by_id(conn, recipient_id)
            if recipient is None:
                return False  # erased: nothing to revoke, and no marketing can reach them
            state = preferences(conn, recipient_id)[topic]
            if state["since"] is not None and not state["subscribed"]:
                return False  # idempotent: the newest event is already a revoke
            record_consent(conn, recipient, topic, False, source,
                           self.rt.settings.policy_version, now, now)
        return True

    def unsubscribe_all(self, recipient_id: int, source: str) -> int:
        """Revoke every topic and sharing, and suppress marketing; return the events written."""
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            recipient = _recipient_by_id(conn, recipient_id)
            if recipient is None:
                return 0
            written = 0
            for name, state in preferences(conn, recipient_id).items():
                already_revoked = state["since"] is not None and not state["subscribed"]
                # Sharing is not a topic: revoke it only when it is on, so that "all" writes
                # an explicit no for every topic but does not invent a sharing decision.
                untouched_sharing = name == THIRD_PARTY_SHARING and not state["subscribed"]
                if already_revoked or untouched_sharing:
                    continue
                record_consent(conn, recipient, name, False, source,
                               self.rt.settings.policy_version, now, now)
                written += 1
            add_suppression(conn, None, recipient.email_hash, "marketing", "unsubscribed",
                            source, now)
        return written

    def view(self, recipient_id: int) -> PreferenceView | None:
        """The preference centre's content, or None when the profile no longer exists."""
        with self.rt.engine.connect() as conn:
            recipient = _recipient_by_id(conn, recipient_id)
            if recipient is None:
                return None
            prefs = preferences(conn, recipient_id)
            rows = list(conn.execute(select(topics).order_by(topics.c.title, topics.c.name)))
            now = self.rt.clock()
            blocked = sorted({
                s.reason for s in suppression_rows(conn, recipient.email_hash)
                if s.reason in _HARD_BLOCKS and (s.expires_at is None or s.expires_at > now)
            })
        return PreferenceView(
            topics=tuple(
                TopicChoice(r.name, r.title, r.description or "", bool(r.third_party),
                            bool(prefs.get(r.name, {}).get("subscribed")))
                for r in rows
            ),
            third_party_sharing=bool(prefs[THIRD_PARTY_SHARING]["subscribed"]),
            blocked_by=tuple(blocked),
        )

    def save(
        self,
        recipient_id: int,
        wanted: Mapping[str, bool],
        evidence: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Record ``preference_center`` events for the choices that differ; return their names.

        Only the names in ``wanted`` are considered (the topics the page showed), so a
        topic created after the page was loaded is not revoked by its missing checkbox.
        Grants on ``double_opt_in`` topics go straight to the ledger: the page was reached
        from a link mailed to the address, which is what the confirmation would prove.
        """
        now = self.rt.clock()
        changed: list[str] = []
        with self.rt.engine.begin() as conn:
            recipient = _recipient_by_id(conn, recipient_id)
            if recipient is None:
                return changed
            current = preferences(conn, recipient_id)
            for name in sorted(wanted):
                if name not in current or bool(current[name]["subscribed"]) == wanted[name]:
                    continue
                granted = wanted[name]
                record_consent(conn, recipient, name, granted, "preference_center",
                               self.rt.settings.policy_version, now, now,
                               evidence if granted else None)
                changed.append(name)
        return changed
