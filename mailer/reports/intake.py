"""Take one raw report (webhook, inbound SMTP, IMAP mailbox) from bytes to committed effects.

read it (:func:`mailer.reports.read_report`), turn it into events
(:mod:`mailer.reports.events`), and let the applier tie them to mail we sent and act
(:class:`mailer.reports.apply.EventApplier`, SPEC 4). What acts on no one is still
recorded: auto-replies and non-complaint feedback as ``ignored`` rows of
``bounce_reports``, reports the reader could not read as ``unrecognised`` with an
address-free excerpt in ``unrecognised_reports`` for ``mailer bounces unrecognised``.

When the report reached a VERP address (``bounces+TOKEN@``, SPEC 12), or names one as the
envelope sender of the original, the token is the authority: the report acts on exactly the
message it names and that message's recipient, whichever address the report itself names.
Every effect has been committed when :meth:`ReportIntake.take` returns, so the inbound
listener may answer 250 then (SPEC 12).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select

from mailer.inbound.addresses import InboundAddresses, Mailbox
from mailer.reports.apply import ApplyReport, EventApplier
from mailer.reports.events import report_events, report_key, report_time
from mailer.reports.excerpt import excerpt
from mailer.reports.model import Report, ReportKind
from mailer.reports.reader import read_report
from mailer.reports.vocabulary import EventType, WebhookEvent, stable_event_id
from mailer.runtime import Runtime
from mailer.store.schema import bounce_reports, messages, unrecognised_reports
from suppression.addresses import InvalidAddressError

#: The ``result`` of a report recorded but never acted on (auto-replies, not-spam...).
IGNORED = "ignored"

#: Events of one report acted on: a genuine report is about one message, and one SMTP
#: transaction carries at most 100 recipients (RFC 5321 4.5.3.1.8).
MAX_EVENTS_PER_REPORT = 100

#: How long excerpts of unrecognised reports are kept, and how many per day at most: a
#: flood of junk to the bounce address must not fill the database.
EXCERPT_RETENTION = timedelta(days=14)
MAX_EXCERPTS_PER_DAY = 1000


@dataclass
class Taken:
    """What became of one report."""

    kind: ReportKind
    source: str
    applied: ApplyReport = field(default_factory=ApplyReport)
    ignored: int = 0
    #: The message a VERP token tied the report to, if any.
    verp_message_id: str | None = None

    def counts(self) -> dict[str, int]:
        """The counts a webhook response gives (SPEC 8)."""
        return self.applied.counts()

    def summary(self) -> str:
        """One line for logs and ``mailer bounces poll``; no addresses."""
        counts = " ".join(f"{k}={v}" for k, v in self.counts().items() if v)
        ignored = f" ignored={self.ignored}" if self.ignored else ""
        verp = " verp" if self.verp_message_id else ""
        return f"{self.kind.value}{verp} {counts}{ignored}".strip()


class ReportIntake:
    """Reads, applies and records reports for one runtime."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        domain = rt.settings.inbound_domain
        self.addresses = (
            InboundAddresses.from_keys(domain, rt.settings.secret_key, rt.settings.old_secret_keys)
            if domain else None
        )

    def verp_message(self, address: str | None) -> str | None:
        """The message row a ``bounces+TOKEN@`` address names, if it is a valid one of ours."""
        if address is None or self.addresses is None:
            return None
        target = self.addresses.read(address)
        if target is None or target.mailbox is not Mailbox.BOUNCES:
            return None
        return target.message_id

    def take(self, raw: bytes, *, source: str, verp_message_id: str | None = None) -> Taken:
        """Read ``raw``, apply what it says, record what it did not; committed on return.

        ``verp_message_id`` is the message named by the token of the address the report was
        delivered to; without one, a VERP address the report names as the original's
        envelope sender counts the same (the token is signed, so only our mail has one).
        """
        report = read_report(raw)
        now = self.rt.clock()
        verp = verp_message_id or self.verp_message(report.bounce_address)
        events = report_events(report, raw, provider=source, received_at=now)
        if verp is not None:
            # The same report bytes reaching two VERP addresses are two reports (one per
            # message): the message is part of each event's identity.
            events = [replace(e, event_id=stable_event_id(source, "verp", verp, e.event_id))
                      for e in self._for_message(report, raw, events, verp, source)]
        taken = Taken(report.kind, source, verp_message_id=verp)
        if not events:
            taken.ignored = self._record_ignored(raw, report, source, verp)
            return taken
        # An unreadable message that is not even shaped like a bounce is not tied to the
        # token's message (see _for_message): it stays unrecognised.
        unread = report.kind is ReportKind.UNRECOGNISED and report.source != "text"
        tied = None if unread else verp
        taken.verp_message_id = tied
        taken.applied = EventApplier(self.rt).apply(
            events, verp_message_id=tied, limit=MAX_EVENTS_PER_REPORT)
        if report.kind is ReportKind.UNRECOGNISED and not taken.applied.duplicates:
            self._keep_excerpt(raw, report, source)
        return taken

    # --- VERP (SPEC 12: the token is the authority) ---------------------------------------

    def _for_message(
        self, report: Report, raw: bytes, events: list[WebhookEvent], verp: str, source: str,
    ) -> list[WebhookEvent]:
        """The one event of a report about the message a VERP token names."""
        if report.kind is ReportKind.UNRECOGNISED:
            if report.source != "text":
                # Not even shaped like a bounce (a reply, spam, a challenge): acting on the
                # message would count a stranger's mail against our recipient.
                return events
            # Shaped like a bounce but naming nobody we could read: the token names the
            # recipient. Soft: no evidence of permanence was read (SPEC 4).
            key = report_key(raw)
            return [WebhookEvent(
                provider=source, event_id=stable_event_id(source, "verp", key, verp),
                type=EventType.SOFT_BOUNCE, recipient=None,
                occurred_at=report_time(raw, self.rt.clock()), raw_type="verp/unread",
            )]
        if len(events) <= 1:
            return events
        to_hash = self._recipient_hash(verp)
        for event in events:
            if event.recipient is not None and to_hash is not None:
                try:
                    if self.rt.address(event.recipient).hash == to_hash:
                        return [event]
                except InvalidAddressError:
                    continue
        # Only one message, to one person, is named: the worst outcome reported speaks.
        order = (EventType.COMPLAINT, EventType.UNSUBSCRIBE, EventType.HARD_BOUNCE,
                 EventType.SOFT_BOUNCE)
        return sorted(events, key=lambda e: order.index(e.type) if e.type in order else 9)[:1]

    def _recipient_hash(self, message_id: str) -> str | None:
        with self.rt.engine.connect() as conn:
            row = conn.execute(
                select(messages.c.to_hash).where(messages.c.id == message_id)).first()
        return None if row is None else row.to_hash

    # --- records of what changed nothing --------------------------------------------------

    def _record_ignored(self, raw: bytes, report: Report, source: str, verp: str | None) -> int:
        """One ``ignored`` row per report (a redelivered one is not counted twice)."""
        now = self.rt.clock()
        key = hashlib.sha256(f"{source}\0ignored\0{report_key(raw)}".encode(
            "utf-8", "surrogatepass")).hexdigest()
        kind = "auto_reply" if report.kind is ReportKind.AUTO_REPLY else "feedback"
        with self.rt.engine.begin() as conn:
            seen = conn.execute(select(bounce_reports.c.id).where(
                bounce_reports.c.source == source, bounce_reports.c.event_key == key)).first()
            if seen is not None:
                return 0
            conn.execute(insert(bounce_reports).values(
                source=source, result=IGNORED, event_type=kind,
                reason=(report.feedback_type or report.kind.value)[:40], email_hash=None,
                message_id=verp if verp and self._exists(conn, verp) else None,
                event_key=key, count=1, received_at=now))
        return 1

    @staticmethod
    def _exists(conn: Connection, message_id: str) -> bool:
        return conn.execute(
            select(messages.c.id).where(messages.c.id == message_id)).first() is not None

    def _keep_excerpt(self, raw: bytes, report: Report, source: str) -> None:
        now = self.rt.clock()
        found = excerpt(raw)
        with self.rt.engine.begin() as conn:
            conn.execute(delete(unrecognised_reports).where(
                unrecognised_reports.c.received_at < now - EXCERPT_RETENTION))
            today = conn.execute(select(func.count()).select_from(unrecognised_reports).where(
                unrecognised_reports.c.received_at >= now - timedelta(days=1))).scalar_one()
            if today >= MAX_EXCERPTS_PER_DAY:
                return
            row: dict[str, Any] = {
                "source": source[:20], "reader": (report.source or "none")[:40],
                "size": found.size, "structure": found.structure,
                "headers": found.headers, "received_at": now,
            }
            conn.execute(insert(unrecognised_reports).values(**row))
