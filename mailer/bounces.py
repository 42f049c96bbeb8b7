"""Apply normalised webhook events to the store: suppressions, ledger, message status.

Idempotent: each provider event id is applied once, in whatever order they arrive
(a row in ``webhook_events`` is the proof it was seen). Rules from SPEC 4:
hard bounce suppresses ``all`` at once; soft bounces count toward the limit within the
window; a complaint suppresses marketing, revokes every topic and blocks service alerts;
5.7.x policy rejections are the sender's problem and suppress nobody.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from mailer.outbox import add_events
from mailer.recipients import Address, add_suppression
from mailer.runtime import Runtime
from mailer.schema import (
    consent_events,
    messages,
    recipients,
    seen_tokens,
    soft_bounces,
    suppressions,
    topics,
    webhook_events,
)
from mailer.webhooks import EventType, WebhookEvent
from suppression.addresses import InvalidAddressError
from suppression.consent import THIRD_PARTY_SHARING

#: A soft-bounce suppression lapses after this long even without a delivery (SPEC 4).
SOFT_BOUNCE_SUPPRESSION = timedelta(days=30)

#: Message states a bounce or complaint may follow: the mail left us, or may have.
_DELIVERED_STATES = ("sent", "unknown", "sending", "deferred")


@dataclass
class ApplyReport:
    """How many events were new and how many were repeats."""

    applied: int = 0
    duplicates: int = 0
    types: dict[str, int] = field(default_factory=dict)


class DatabaseSeenTokens:
    """Mailgun replay protection backed by the ``seen_tokens`` table (all processes)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def add_if_new(self, token: str, expires_at: datetime) -> bool:
        """Remember ``token``; False when it was already used."""
        now = self.rt.clock()
        try:
            with self.rt.engine.begin() as conn:
                conn.execute(delete(seen_tokens).where(seen_tokens.c.expires_at < now))
                conn.execute(insert(seen_tokens).values(token=token[:200], expires_at=expires_at))
        except IntegrityError:
            return False
        return True


class EventApplier:
    """Applies events within one transaction per request."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def apply(self, events: Sequence[WebhookEvent]) -> ApplyReport:
        """Apply each new event; repeats change nothing."""
        report = ApplyReport()
        now = self.rt.clock()
        with self.rt.engine.begin() as conn:
            for event in events:
                message = self._message(conn, event.message_id)
                if not self._first_time(conn, event, message, now):
                    report.duplicates += 1
                    continue
                email_hash, address = self._recipient(event, message)
                self._apply_one(conn, event, message, email_hash, address, now)
                report.applied += 1
                report.types[event.type.value] = report.types.get(event.type.value, 0) + 1
        return report

    @staticmethod
    def _message(conn: Connection, message_id: str | None) -> Any:
        if not message_id:
            return None
        return conn.execute(
            select(messages.c.id, messages.c.to_hash, messages.c.topic, messages.c.status,
                   messages.c.recipient_id)
            .where(messages.c.message_id_header == f"<{message_id}>")
        ).first()

    @staticmethod
    def _first_time(
        conn: Connection, event: WebhookEvent, message: Row[Any] | None, now: datetime
    ) -> bool:
        try:
            with conn.begin_nested():
                conn.execute(insert(webhook_events).values(
                    provider=event.provider, event_id=event.event_id[:200],
                    type=event.type.value, message_id=message.id if message else None,
                    received_at=now,
                ))
        except IntegrityError:
            return False
        return True

    def _recipient(
        self, event: WebhookEvent, message: Row[Any] | None
    ) -> tuple[str | None, Address | None]:
        """The keyed hash (and address) the event is about: from the payload, else our row."""
        if event.recipient:
            try:
                address = self.rt.address(event.recipient)
                return address.hash, address
            except InvalidAddressError:
                pass
        if message is not None and message.to_hash:
            return message.to_hash, None
        return None, None

    def _apply_one(
        self, conn: Connection, event: WebhookEvent, message: Row[Any] | None,
        email_hash: str | None, address: Address | None, now: datetime,
    ) -> None:
        source = f"{event.provider}:{event.event_id}"[:200]
        detail = event.diagnostic or event.raw_type
        kind = event.type
        if message is not None:
            add_events(conn, [(message.id, f"webhook_{kind.value}", detail)], now)
        if email_hash is None:
            return  # nothing to suppress: an event about nobody we know
        if kind is EventType.HARD_BOUNCE:
            self._set_status(conn, message, "bounced", now)
            if not event.policy_rejection:
                add_suppression(conn, address, email_hash, "all", "hard_bounce", source, now)
        elif kind is EventType.SOFT_BOUNCE:
            self._soft_bounce(conn, address, email_hash, source, event.occurred_at, now)
        elif kind is EventType.COMPLAINT:
            self._set_status(conn, message, "complained", now)
            add_suppression(conn, address, email_hash, "marketing", "complaint", source, now)
            self._revoke_all(conn, email_hash, "complaint", event.occurred_at, now)
        elif kind is EventType.UNSUBSCRIBE:
            topic = message.topic if message is not None else None
            if topic:
                self._revoke(conn, email_hash, [topic], "unsubscribe_link", event.occurred_at,
                             now)
            else:
                add_suppression(conn, address, email_hash, "marketing", "unsubscribed",
                                source, now)
                self._revoke_all(conn, email_hash, "unsubscribe_link", event.occurred_at, now)
        elif kind is EventType.DELIVERED:
            # A delivery ends a soft-bounce suppression early (SPEC 4).
            conn.execute(delete(suppressions).where(
                suppressions.c.email_hash == email_hash,
                suppressions.c.reason == "soft_bounce_limit"))
            conn.execute(delete(soft_bounces).where(soft_bounces.c.email_hash == email_hash))

    @staticmethod
    def _set_status(conn: Connection, message: Row[Any] | None, status: str,
                    now: datetime) -> None:
        if message is None:
            return
        conn.execute(
            update(messages)
            .where(messages.c.id == message.id, messages.c.status.in_(_DELIVERED_STATES))
            .values(status=status, updated_at=now)
        )

    def _soft_bounce(self, conn: Connection, address: Address | None, email_hash: str,
                     source: str, occurred_at: datetime, now: datetime) -> None:
        settings = self.rt.settings
        conn.execute(insert(soft_bounces).values(email_hash=email_hash, occurred_at=occurred_at))
        count = conn.execute(
            select(func.count()).select_from(soft_bounces).where(
                soft_bounces.c.email_hash == email_hash,
                soft_bounces.c.occurred_at > now - settings.soft_bounce_window,
            )
        ).scalar_one()
        if count >= settings.soft_bounce_limit:
            add_suppression(conn, address, email_hash, "all", "soft_bounce_limit", source, now,
                            expires_at=now + SOFT_BOUNCE_SUPPRESSION)

    def _revoke_all(self, conn: Connection, email_hash: str, source: str,
                    occurred_at: datetime, now: datetime) -> None:
        names = [r.name for r in conn.execute(select(topics.c.name))]
        self._revoke(conn, email_hash, [*names, THIRD_PARTY_SHARING], source, occurred_at, now)

    def _revoke(self, conn: Connection, email_hash: str, names: Sequence[str], source: str,
                occurred_at: datetime, now: datetime) -> None:
        """Append revokes to the ledger of every profile with this address."""
        ids = [r.id for r in conn.execute(
            select(recipients.c.id).where(recipients.c.email_hash == email_hash))]
        # Dated when we learn of it, not by the provider's clock: provider times have
        # second resolution and other clocks, and a complaint must outrank every grant
        # recorded before it arrived. The provider's time is kept as evidence.
        evidence = {"reported_at": occurred_at.isoformat()}
        rows = [
            {"recipient_id": rid, "email_hash": email_hash, "topic": name, "granted": False,
             "source": source, "policy_version": self.rt.settings.policy_version,
             "occurred_at": now, "recorded_at": now, "evidence": evidence}
            for rid in ids for name in names
        ]
        if rows:
            conn.execute(insert(consent_events), rows)
