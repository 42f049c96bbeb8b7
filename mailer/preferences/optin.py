"""Consent changes by the recipient's own hand: double opt-in, unsubscribe, preference centre.

Everything here is reached from a signed link that was mailed to the address, so the
person acting has shown control of that mailbox, and of no other: a link may take consent
away whatever address it went to, but grants it only while the address it was mailed to is
still the profile's (SPEC 3, "Consent belongs to an address"). Each function writes its
ledger events (and, for "unsubscribe from all marketing", the suppression) in one
transaction that has committed when it returns: the public pages answer only after that
(SPEC 4).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update

from mailer.errors import Conflict
from mailer.keys import ApiKey
from mailer.preferences.tokens import Token
from mailer.runtime import Runtime
from mailer.sending.accept import Acceptor, SendRequest
from mailer.store.recipients import (
    add_suppression,
    consent_history,
    get_recipient,
    preferences,
    record_consent,
    suppression_rows,
    topic_row,
)
from mailer.store.schema import consent_requests, messages, recipients, topics
from suppression.consent import THIRD_PARTY_SHARING, grant_conflicts

log = logging.getLogger(__name__)

#: The sources an API caller may record (SPEC 3, "Only the person's own channels speak
#: for the person").
API_SOURCES = frozenset({"signup_form", "api", "import", "admin"})
#: The person's own channels and their mailbox's reports: written only by the public
#: pages, the inbound listener and the webhooks, which see the person act. An API request
#: claiming one is refused, even for a source no part of this build writes yet.
OWN_CHANNEL_SOURCES = frozenset({"preference_center", "double_opt_in", "unsubscribe_link",
                                 "one_click", "mailto", "complaint"})
#: Grants from these sources wait for confirmation on a ``double_opt_in`` topic: a form or
#: a service said yes, but nothing yet shows that the mailbox is the person's. That holds
#: for every source the API accepts, operator ones included (SPEC 3).
PENDING_SOURCES = API_SOURCES

#: At most this many confirmation mails per address per :data:`CONFIRMATION_WINDOW`:
#: enough to resend a lost one, too few to mail-bomb someone by typing their address
#: into a signup form over and over (SPEC 3).
DEFAULT_CONFIRMATION_LIMIT = 3
#: The rolling window of :data:`DEFAULT_CONFIRMATION_LIMIT`.
CONFIRMATION_WINDOW = timedelta(hours=24)
#: A pending request older than this can no longer be confirmed; the person asks again.
DEFAULT_REQUEST_TTL = timedelta(days=7)
#: The template of the confirmation mail (category ``registration_confirmation``, not
#: counted by the one-time rule: see :mod:`mailer.store.facts`).
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
class SaveOutcome:
    """What a preference-centre post did: the choices written and the grants refused."""

    changed: tuple[str, ...]
    #: Grants asked for through a link that may not grant (mailed to another address, or
    #: minted before links were bound to addresses); nothing was written for them.
    refused: tuple[str, ...]


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
    #: Whether this link may grant: it was mailed to the profile's current address.
    may_grant: bool = True


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
        # Bound to the address the mail goes to: confirming proves control of that mailbox.
        token = self.rt.signer.sign("c", recipient.id, topic, recipient.email_hash)
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

    def may_grant(self, conn: Connection, token: Token) -> str | None:
        """None when ``token`` may grant now; else why not: ``wrong_address`` or ``unbound``.

        ``unbound`` is a link minted before links were bound to addresses: it cannot say
        which mailbox it reached, so it confirms nothing (the person signs up again).
        """
        recipient = _recipient_by_id(conn, token.recipient_id)
        if token.address is None:
            return "unbound"
        if recipient is None or not self.rt.signer.mailed_to(token, recipient.email_hash):
            return "wrong_address"
        return None

    def state(self, token: Token) -> str:
        """``pending``, ``confirmed``, ``none``, or why the link may not confirm (see above)."""
        recipient_id, topic = token.recipient_id, token.topic
        now = self.rt.clock()
        with self.rt.engine.connect() as conn:
            refused = self.may_grant(conn, token)
            rows = list(conn.execute(
                select(consent_requests.c.confirmed_at, consent_requests.c.recorded_at).where(
                    consent_requests.c.recipient_id == recipient_id,
                    consent_requests.c.topic == topic,
                )
            ))
        if any(r.confirmed_at is None and r.recorded_at > now - self.ttl for r in rows):
            return refused or "pending"
        return "confirmed" if any(r.confirmed_at is not None for r in rows) else "none"

    def confirm(self, token: Token, evidence: Mapping[str, Any] | None = None) -> str:
        """Turn pending requests into one ledger grant.

        Returns ``confirmed``, ``already``, ``none``, or ``wrong_address`` / ``unbound``
        when the link was not mailed to the profile's current address (nothing written).
        """
        recipient_id, topic = token.recipient_id, token.topic
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            recipient = _recipient_by_id(conn, recipient_id)
            if recipient is None:
                return "none"
            # Checked in the transaction that writes, against the address as it is now.
            refused = self.may_grant(conn, token)
            if refused is not None:
                return refused
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

    def preferences_token(self, token: Token) -> str:
        """A preference-centre token for the person a link names, bound like that link.

        Bound to the profile's address only when ``token`` was mailed to it; otherwise the
        new link is revoke-only too, so a page cannot launder an old link into a granting one.
        """
        with self.rt.engine.connect() as conn:
            recipient = _recipient_by_id(conn, token.recipient_id)
        mailed: str | None = None
        if recipient is not None and self.rt.signer.mailed_to(token, recipient.email_hash):
            mailed = recipient.email_hash
        return self.rt.signer.sign("p", token.recipient_id, email_hash=mailed)

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

    def view(self, token: Token) -> PreferenceView | None:
        """The preference centre's content, or None when the profile no longer exists."""
        recipient_id = token.recipient_id
        with self.rt.engine.connect() as conn:
            recipient = _recipient_by_id(conn, recipient_id)
            if recipient is None:
                return None
            may_grant = self.rt.signer.mailed_to(token, recipient.email_hash)
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
            may_grant=may_grant,
        )

    def save(
        self,
        token: Token,
        wanted: Mapping[str, bool],
        evidence: Mapping[str, Any] | None = None,
    ) -> SaveOutcome:
        """Record ``preference_center`` events for the choices that differ.

        Only the names in ``wanted`` are considered (the topics the page showed), so a
        topic created after the page was loaded is not revoked by its missing checkbox.
        Grants on ``double_opt_in`` topics go straight to the ledger when the link was
        mailed to the profile's current address, which is what the confirmation would
        prove. Through any other link, revokes are written and grants refused (SPEC 3).
        """
        recipient_id = token.recipient_id
        now = self.rt.clock()
        changed: list[str] = []
        refused: list[str] = []
        with self.rt.engine.begin() as conn:
            recipient = _recipient_by_id(conn, recipient_id)
            if recipient is None:
                return SaveOutcome((), ())
            # Checked in the writing transaction, against the address as it is now.
            may_grant = self.rt.signer.mailed_to(token, recipient.email_hash)
            current = preferences(conn, recipient_id)
            for name in sorted(wanted):
                if name not in current or bool(current[name]["subscribed"]) == wanted[name]:
                    continue
                granted = wanted[name]
                if granted and not may_grant:
                    refused.append(name)
                    continue
                record_consent(conn, recipient, name, granted, "preference_center",
                               self.rt.settings.policy_version, now, now,
                               evidence if granted else None)
                changed.append(name)
        return SaveOutcome(tuple(changed), tuple(refused))
