"""Apply normalised webhook events to the store: suppressions, ledger, message status.

A report acts only on mail we sent (SPEC 4): each event is first tied to a message we
sent to the address it names (:mod:`mailer.reports.matching`). An event that cannot be
tied is ``unmatched``; one without a usable recipient is ``unrecognised``. Neither changes
anything but a row in ``bounce_reports``, which /metrics counts. At most
:data:`MAX_EVENTS` events of one request are acted on, so no report can make unbounded
work.

Idempotent: each provider event id is applied once, in whatever order they arrive
(a row in ``webhook_events`` is the proof it was seen). Rules from SPEC 4:
hard bounce suppresses ``all`` at once; soft bounces count toward the limit within the
window; a complaint suppresses marketing, revokes every topic and blocks service alerts;
5.7.x policy rejections are the sender's problem and suppress nobody.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from mailer.events.body import reply_code
from mailer.events.record import MessageChange, record_message_changes, record_unsubscribe
from mailer.reports.matching import Miss, ReportMatcher, Result, Tie, chunks
from mailer.reports.vocabulary import EventType, WebhookEvent
from mailer.runtime import Runtime
from mailer.store.outbox import add_events
from mailer.store.policy_versions import version_in_force
from mailer.store.recipients import Address, add_suppression
from mailer.store.schema import (
    bounce_reports,
    consent_events,
    messages,
    recipients,
    seen_tokens,
    soft_bounces,
    suppressions,
    topics,
    webhook_events,
)
from mailer.store.status import REPORTABLE, MessageStatus
from suppression.consent import THIRD_PARTY_SHARING

#: A soft-bounce suppression lapses after this long even without a delivery (SPEC 4).
SOFT_BOUNCE_SUPPRESSION = timedelta(days=30)

#: Most events acted on per request, by source. A DSN or ARF report is about one message,
#: and we send every message to exactly one recipient, so a genuine report names one
#: recipient (a few if a relay forwarded or expanded it). 100 is the most a single SMTP
#: transaction must carry (RFC 5321 section 4.5.3.1.8), so a genuine report never lists
#: more, while a forged 5 MiB report with 20,000 recipients costs at most 100 lookups.
MAX_EVENTS: dict[str, int] = {"dsn": 100}
#: The JSON sources send one event per request, or (SendGrid) a batch of separate events
#: inside a 1 MiB body; real events are 200 bytes or more, so no real batch exceeds this.
DEFAULT_MAX_EVENTS = 5000

@dataclass
class ApplyReport:
    """How many events were applied, repeated, unmatched and unrecognised."""

    applied: int = 0
    duplicates: int = 0
    unmatched: int = 0
    unrecognised: int = 0
    types: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """The counts as the webhook response body gives them."""
        return {"applied": self.applied, "duplicates": self.duplicates,
                "unmatched": self.unmatched, "unrecognised": self.unrecognised}


def max_events(provider: str) -> int:
    """Most events of one request from ``provider`` that are acted on."""
    return MAX_EVENTS.get(provider, DEFAULT_MAX_EVENTS)


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
    """Applies one request's events within one transaction."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._topic_names: list[str] | None = None

    def apply(
        self, events: Sequence[WebhookEvent], *, verp_message_id: str | None = None,
        limit: int | None = None,
    ) -> ApplyReport:
        """Apply each new event tied to mail we sent; everything else changes nothing.

        ``verp_message_id`` is the id of our message named by a VERP token of the report's
        envelope (SPEC 12): it then ties every event to that message and its recipient.
        ``limit`` overrides :func:`max_events`; events past it are counted unrecognised.
        """
        report = ApplyReport()
        if not events:
            return report
        now = self.rt.clock()
        cap = limit if limit is not None else max_events(events[0].provider)
        kept, overflow = list(events[:cap]), events[cap:]
        rows: list[dict[str, Any]] = []
        with self.rt.engine.begin() as conn:
            ties = ReportMatcher(self.rt).match(conn, kept, verp_message_id, now)
            fresh = self._first_time(conn, kept, ties, now)
            for event, tie, new in zip(kept, ties, fresh, strict=True):
                if not new:
                    report.duplicates += 1
                    continue
                if isinstance(tie, Tie):
                    self._apply_one(conn, event, tie, now)
                    report.applied += 1
                    report.types[event.type.value] = report.types.get(event.type.value, 0) + 1
                    rows.append(_report_row(event, Result.APPLIED, None, tie.email_hash,
                                            tie.message.id if tie.message else None, now))
                else:
                    if tie.result is Result.UNMATCHED:
                        report.unmatched += 1
                    else:
                        report.unrecognised += 1
                    rows.append(_report_row(event, tie.result, tie.reason, tie.email_hash,
                                            None, now))
            # Beyond the limit nothing is looked up or acted on: one aggregate row per event
            # type says how many were left, so an operator sees the report was cut short.
            for type_, count in Counter(e.type.value for e in overflow).items():
                report.unrecognised += count
                rows.append({"source": overflow[0].provider, "result": Result.UNRECOGNISED.value,
                             "event_type": type_, "reason": "over_limit", "email_hash": None,
                             "message_id": None, "event_key": None, "count": count,
                             "received_at": now})
            if rows:
                conn.execute(insert(bounce_reports), rows)
        return report

    def _first_time(
        self, conn: Connection, events: Sequence[WebhookEvent], ties: Sequence[Tie | Miss],
        now: datetime,
    ) -> list[bool]:
        """True for each event not seen before; claims the tied ones in ``webhook_events``.

        An event that changes nothing leaves no trace outside ``bounce_reports``, where a
        repeat of it is recognised so that a redelivered report is counted once.
        """
        fresh = [True] * len(events)
        tied = [i for i, tie in enumerate(ties) if isinstance(tie, Tie)]
        claimed = self._claim(conn, [events[i] for i in tied],
                              [t for t in ties if isinstance(t, Tie)], now)
        for index, new in zip(tied, claimed, strict=True):
            fresh[index] = new
        missed = [i for i, tie in enumerate(ties) if not isinstance(tie, Tie)]
        keys = {i: (events[i].provider, _event_key(events[i])) for i in missed}
        seen = _known(conn, bounce_reports.c.source, bounce_reports.c.event_key,
                      set(keys.values()))
        for index in missed:
            fresh[index] = keys[index] not in seen
            seen.add(keys[index])
        return fresh

    @staticmethod
    def _claim(
        conn: Connection, events: Sequence[WebhookEvent], ties: Sequence[Tie], now: datetime,
    ) -> list[bool]:
        """Record each event id once in ``webhook_events``; True for those new to it."""
        seen = _known(conn, webhook_events.c.provider, webhook_events.c.event_id,
                      {(e.provider, e.event_id[:200]) for e in events})
        fresh: list[bool] = []
        rows: list[tuple[int, dict[str, Any]]] = []
        for index, (event, tie) in enumerate(zip(events, ties, strict=True)):
            key = (event.provider, event.event_id[:200])
            if key in seen:
                fresh.append(False)
                continue
            seen.add(key)
            fresh.append(True)
            rows.append((index, {
                "provider": key[0], "event_id": key[1], "type": event.type.value,
                "message_id": tie.message.id if tie.message is not None else None,
                "received_at": now,
            }))
        if not rows:
            return fresh
        try:
            with conn.begin_nested():
                conn.execute(insert(webhook_events), [row for _, row in rows])
        except IntegrityError:
            # A concurrent request recorded some of them meanwhile: claim one by one, and
            # the ones it already has are repeats here.
            for index, row in rows:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(webhook_events).values(**row))
                except IntegrityError:
                    fresh[index] = False
        return fresh

    # --- effects --------------------------------------------------------------------------

    def _apply_one(self, conn: Connection, event: WebhookEvent, tie: Tie, now: datetime) -> None:
        source = f"{event.provider}:{event.event_id}"[:200]
        detail = event.diagnostic or event.raw_type
        kind, message = event.type, tie.message
        email_hash, address = tie.email_hash, tie.address
        if message is not None:
            add_events(conn, [(message.id, f"webhook_{kind.value}", detail)], now)
        if kind is EventType.HARD_BOUNCE:
            self._set_status(conn, message, MessageStatus.BOUNCED, now, event)
            if not event.policy_rejection:
                add_suppression(conn, address, email_hash, "all", "hard_bounce", source, now)
        elif kind is EventType.SOFT_BOUNCE:
            self._soft_bounce(conn, address, email_hash, source, event.occurred_at, now)
        elif kind is EventType.COMPLAINT:
            self._set_status(conn, message, MessageStatus.COMPLAINED, now, event)
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
            # SPEC 13: the person's own revoke, reported by the provider whose link it was.
            record_unsubscribe(conn, now, topics=[topic] if topic else self._topic_names or [],
                               all_marketing=not topic, source="unsubscribe_link",
                               email_hash=email_hash)
        elif kind is EventType.DELIVERED:
            # A delivery ends a soft-bounce suppression early (SPEC 4).
            conn.execute(delete(suppressions).where(
                suppressions.c.email_hash == email_hash,
                suppressions.c.reason == "soft_bounce_limit"))
            conn.execute(delete(soft_bounces).where(soft_bounces.c.email_hash == email_hash))

    @staticmethod
    def _set_status(conn: Connection, message: Row[Any] | None, status: MessageStatus,
                    now: datetime, event: WebhookEvent) -> None:
        if message is None:
            return
        changed = conn.execute(
            update(messages)
            .where(messages.c.id == message.id, messages.c.status.in_(sorted(REPORTABLE)))
            .values(status=status, updated_at=now)
        ).rowcount
        if changed:
            # SPEC 13: message.bounced / message.complained, in this transaction.
            record_message_changes(conn, [MessageChange(
                message.id, status, event.type.value, reply_code(event.diagnostic))], now)

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
        if self._topic_names is None:
            self._topic_names = [r.name for r in conn.execute(select(topics.c.name))]
        self._revoke(conn, email_hash, [*self._topic_names, THIRD_PARTY_SHARING], source,
                     occurred_at, now)

    def _revoke(self, conn: Connection, email_hash: str, names: Sequence[str], source: str,
                occurred_at: datetime, now: datetime) -> None:
        """Append revokes to the ledger of every profile with this address."""
        ids = [r.id for r in conn.execute(
            select(recipients.c.id).where(recipients.c.email_hash == email_hash))]
        # Dated when we learn of it, not by the provider's clock: provider times have
        # second resolution and other clocks, and a complaint must outrank every grant
        # recorded before it arrived. The provider's time is kept as evidence.
        evidence = {"reported_at": occurred_at.isoformat()}
        # SPEC 14: the version in force when the revoke is dated.
        version = version_in_force(conn, now, self.rt.settings.policy_version) if ids else ""
        rows = [
            {"recipient_id": rid, "email_hash": email_hash, "topic": name, "granted": False,
             "source": source, "policy_version": version,
             "occurred_at": now, "recorded_at": now, "evidence": evidence}
            for rid in ids for name in names
        ]
        if rows:
            conn.execute(insert(consent_events), rows)


def _known(
    conn: Connection, provider_column: Any, id_column: Any, keys: set[tuple[str, str]]
) -> set[tuple[str, str]]:
    """The (provider, id) pairs among ``keys`` already in the table of those columns."""
    found: set[tuple[str, str]] = set()
    for provider in sorted({k[0] for k in keys}):
        ids = sorted(k[1] for k in keys if k[0] == provider)
        for chunk in chunks(ids):
            found.update((provider, r[0]) for r in conn.execute(
                select(id_column).where(provider_column == provider, id_column.in_(chunk))
            ))
    return found


def _event_key(event: WebhookEvent) -> str:
    """A digest of the event's identity, stored instead of ids that may embed an address."""
    text = f"{event.provider}\0{event.event_id}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(text).hexdigest()


def _report_row(event: WebhookEvent, result: Result, reason: str | None,
                email_hash: str | None, message_id: str | None,
                now: datetime) -> dict[str, Any]:
    return {"source": event.provider, "result": result.value, "event_type": event.type.value,
            "reason": reason, "email_hash": email_hash, "message_id": message_id,
            "event_key": _event_key(event), "count": 1, "received_at": now}
