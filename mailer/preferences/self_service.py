"""Unsubscribe and the preference centre: consent changes by the recipient's own hand.

Everything here is reached from a signed link that was mailed to the address, so the
person acting has shown control of that mailbox, and of no other: a link may take consent
away whatever address it went to, but grants it only while the address it was mailed to is
still the profile's (SPEC 3, "Consent belongs to an address"). Each method writes its
ledger events (and, for "unsubscribe from all marketing", the suppression) in one
transaction that has committed when it returns: the public pages answer only after that
(SPEC 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from mailer.events.record import record_unsubscribe
from mailer.preferences.tokens import Token
from mailer.runtime import Runtime
from mailer.store.recipients import (
    add_suppression,
    preferences,
    recipient_by_id,
    record_consent,
    suppression_rows,
)
from mailer.store.schema import topics
from suppression.consent import THIRD_PARTY_SHARING

#: Suppression reasons the preference centre explains instead of hiding: marketing stays
#: blocked whatever is ticked until an admin lifts them (SPEC 4).
_HARD_BLOCKS = frozenset({"complaint", "hard_bounce", "manual", "erased", "soft_bounce_limit"})


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
            recipient = recipient_by_id(conn, token.recipient_id)
        mailed: str | None = None
        if recipient is not None and self.rt.signer.mailed_to(token, recipient.email_hash):
            mailed = recipient.email_hash
        return self.rt.signer.sign("p", token.recipient_id, email_hash=mailed)

    def recipient_exists(self, recipient_id: int) -> bool:
        """Whether the profile a token names still exists (erasure removes it)."""
        with self.rt.engine.connect() as conn:
            return recipient_by_id(conn, recipient_id) is not None

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
            recipient = recipient_by_id(conn, recipient_id)
            if recipient is None:
                return False  # erased: nothing to revoke, and no marketing can reach them
            state = preferences(conn, recipient_id)[topic]
            if state["since"] is not None and not state["subscribed"]:
                return False  # idempotent: the newest event is already a revoke
            record_consent(conn, recipient, topic, False, source,
                           self.rt.settings.policy_version, now, now)
            # SPEC 13: the service hears of it from the same transaction.
            record_unsubscribe(conn, now, topics=[topic], all_marketing=False, source=source,
                               recipient_id=recipient_id)
        return True

    def unsubscribe_all(self, recipient_id: int, source: str) -> int:
        """Revoke every topic and sharing, and suppress marketing; return the events written."""
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            recipient = recipient_by_id(conn, recipient_id)
            if recipient is None:
                return 0
            written = 0
            revoked: list[str] = []
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
                revoked.append(name)
            suppressed = add_suppression(conn, None, recipient.email_hash, "marketing",
                                         "unsubscribed", source, now)
            if written or suppressed:
                record_unsubscribe(conn, now, topics=revoked, all_marketing=True,
                                   source=source, recipient_id=recipient_id)
        return written

    def view(self, token: Token) -> PreferenceView | None:
        """The preference centre's content, or None when the profile no longer exists."""
        recipient_id = token.recipient_id
        with self.rt.engine.connect() as conn:
            recipient = recipient_by_id(conn, recipient_id)
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
            recipient = recipient_by_id(conn, recipient_id)
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
            revokes = [name for name in changed if not wanted[name]]
            if revokes:
                record_unsubscribe(conn, now, topics=revokes, all_marketing=False,
                                   source="preference_center", recipient_id=recipient_id)
        return SaveOutcome(tuple(changed), tuple(refused))
