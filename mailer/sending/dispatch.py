"""The send procedure a worker runs for a chunk of message ids.

claim (compare-and-set) -> decide again (the send-time decision is the one that counts)
-> render and build -> SMTP over pooled connections -> record every outcome. Database
work is batched per chunk: one transaction to claim and decide, one to record.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection, Row, bindparam, select

from mailer.campaigns.lifecycle import send_context
from mailer.errors import MailerError
from mailer.inbound.addresses import InboundAddresses
from mailer.mail.locales import requested, translated
from mailer.mail.mime import Envelope, MessageBuilder
from mailer.mail.stencil import StencilCache
from mailer.mail.templates import Rendered
from mailer.runtime import Runtime
from mailer.sending.compliance import (
    POSTAL_ADDRESS_MISSING,
    PromotionLinks,
    add_footer,
    has_postal_address,
    list_headers,
)
from mailer.smtp.replies import Outcome as SmtpOutcome
from mailer.smtp.replies import SendResult
from mailer.store.facts import Target, load_states
from mailer.store.outbox import Outcome, claim, finish, renew_lease
from mailer.store.recipients import add_suppression
from mailer.store.schema import messages, recipients, topics
from mailer.store.status import MessageStatus
from suppression.policy import Category, Limits, Topic, decide

log = logging.getLogger(__name__)

#: How long each category may keep retrying before it is given up as ``failed``; a
#: registration link is stale after a day, legal notices get the RFC 5321 4-5 days.
MAX_AGE = {
    Category.REGISTRATION_CONFIRMATION: timedelta(days=1),
    Category.SERVICE_ALERT: timedelta(days=1),
    Category.LEGAL_NOTICE: timedelta(days=5),
    Category.PROMOTION: timedelta(days=1),
}
#: Retry delays grow from this base, doubling per attempt, up to :data:`MAX_BACKOFF`.
DEFAULT_RETRY_BASE = timedelta(seconds=30)
MAX_BACKOFF = timedelta(hours=1)


class SyncTransport(Protocol):
    """Sends envelopes and reports one result each, in order, never raising."""

    def send_many(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        """Send them all."""
        ...


@dataclass
class Report:
    """What one run did, for logs and tests."""

    claimed: int = 0
    suppressed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def backoff(attempt: int, base: timedelta, rng: random.Random = random.Random()) -> timedelta:  # noqa: B008
    """Exponential backoff with +-20 % jitter, so retries from one outage spread out."""
    delay: timedelta = min(base * (2 ** max(attempt - 1, 0)), MAX_BACKOFF)
    factor: float = rng.uniform(0.8, 1.2)
    return delay * factor


# Built once: building and keying a select per chunk cost ~200 us each.
_LOCALES = (
    select(messages.c.id, messages.c.locale, recipients.c.locale.label("profile_locale"))
    .select_from(messages.outerjoin(recipients, recipients.c.id == messages.c.recipient_id))
    .where(messages.c.id.in_(bindparam("ids", expanding=True)))
)
_TOPICS = select(topics.c.name, topics.c.title, topics.c.third_party,
                 topics.c.translations).where(topics.c.name.in_(bindparam("names",
                                                                          expanding=True)))


def requested_locales(conn: Connection, ids: Sequence[str]) -> dict[str, str | None]:
    """Per message id, the locale asked for: the message's own, else its recipient's now."""
    if not ids:
        return {}
    rows = conn.execute(_LOCALES, {"ids": list(ids)})
    return {r.id: requested(r.locale, r.profile_locale) for r in rows}


class Dispatcher:
    """Runs the send procedure with the runtime's database and the given transport."""

    def __init__(
        self,
        runtime: Runtime,
        transport: SyncTransport,
        builder: MessageBuilder,
        retry_base: timedelta = DEFAULT_RETRY_BASE,
        slice_size: int = 16,
        reuse_renders: bool = True,
    ) -> None:
        self.rt = runtime
        self.transport = transport
        self.builder = builder
        self.retry_base = retry_base
        self.slice_size = slice_size
        #: Rendered templates to fill per message (see :meth:`_build`); ``reuse_renders``
        #: off renders every message in full (the same bytes: bench/render_reuse.py).
        self.stencils = StencilCache()
        self.reuse_renders = reuse_renders
        settings = runtime.settings
        # VERP (SPEC 6): with an inbound domain, each message's envelope sender names it.
        self.inbound = (
            InboundAddresses.from_keys(settings.inbound_domain, settings.secret_key,
                                       settings.old_secret_keys)
            if settings.inbound_domain else None
        )

    def run(self, ids: Sequence[str]) -> Report:
        """Claim, decide, send and record the given messages."""
        settings = self.rt.settings
        report = Report()
        now = self.rt.clock()
        # The claim is its own short write transaction; what the decision reads comes
        # after it, from a read-only snapshot. On SQLite the write lock is one for the
        # whole database, so every read done while holding it holds up the API, the
        # scheduler and the other workers. The claimed rows are ours by their lease.
        with self.rt.engine.begin() as conn:
            rows = claim(conn, ids, now, settings.send_lease)
        report.claimed = len(rows)
        if not rows:
            return report
        with self.rt.engine.connect() as conn:
            names = sorted({r.topic for r in rows if r.topic})
            topic_info: dict[str, Any] = {
                t.name: t for t in conn.execute(_TOPICS, {"names": names})
            } if names else {}
            locales = requested_locales(conn, [r.id for r in rows])
            # Campaign messages: the campaign's state and shared variables (SPEC 9).
            campaign = send_context(conn, sorted({r.campaign_id for r in rows if r.campaign_id}))
            shared = {key: context.data for key, context in campaign.items()}
            targets = [
                Target(
                    key=r.id, category=Category(r.category), topic=r.topic,
                    recipient_id=r.recipient_id, to_hash=r.to_hash or "", template=r.template,
                    message_id=r.id, created_at=r.created_at,
                )
                for r in rows
            ]
            states = load_states(conn, targets, now, settings.service_alert_window)
        limits = Limits(settings.service_alert_limit, settings.service_alert_window)
        early: list[Outcome] = []
        to_send: list[Row[Any]] = []
        for row, target in zip(rows, targets, strict=True):
            stop = campaign[row.campaign_id].stop() if row.campaign_id in campaign else None
            if stop is not None:
                # Paused or cancelled since it was queued: held or cancelled, not sent.
                early.append(Outcome(row.id, stop[0], reason=stop[1]))
                continue
            if row.attempts > settings.max_attempts:
                # Our own counter: a SIGKILLed worker skips dramatiq's retry counting,
                # so a message that kills its worker would otherwise loop forever.
                early.append(Outcome(row.id, MessageStatus.FAILED, reason="too_many_attempts"))
                continue
            info = topic_info.get(row.topic) if row.topic else None
            topic = Topic(row.topic, bool(info.third_party)) if info is not None else None
            promo = target.category is Category.PROMOTION
            if promo and (topic is None or row.recipient_id is None):
                early.append(Outcome(row.id, MessageStatus.SUPPRESSED, reason="no_consent"))
                continue
            if promo and not has_postal_address(settings.postal_address):
                early.append(Outcome(row.id, MessageStatus.FAILED,
                                     reason=POSTAL_ADDRESS_MISSING))
                continue
            decision = decide(target.category, topic, states[row.id], now, limits)
            if not decision.allowed:
                reason = decision.reason.value if decision.reason else None
                early.append(Outcome(row.id, MessageStatus.SUPPRESSED, reason=reason))
                continue
            to_send.append(row)
        if early:
            with self.rt.engine.begin() as conn:
                finish(conn, early, now)
        report.suppressed = sum(1 for o in early if o.status == MessageStatus.SUPPRESSED)
        for o in early:
            report.outcomes[o.status] = report.outcomes.get(o.status, 0) + 1
        # Record after every slice, not once per chunk: a worker killed between a 250 and
        # our commit resends what it had not recorded, so the slice bounds the duplicates.
        held, lost = now + settings.send_lease, set[str]()
        for start in range(0, len(to_send), self.slice_size):
            held = self._keep_lease(to_send[start:], held, lost)
            part = [r for r in to_send[start : start + self.slice_size] if r.id not in lost]
            if part:
                self._send_slice(part, topic_info, report, shared, locales)
        return report

    def _keep_lease(self, rest: list[Row[Any]], held: datetime, lost: set[str]) -> datetime:
        """Once half the lease is spent (a slow relay, a paced domain), renew it on the
        rows still to send; add those no longer ours to ``lost``; return the lease's end.

        A lease that ran out lets the sweeper hand the row to another worker; sending it
        here too would be a duplicate, so a row whose lease is no longer ours is dropped.
        """
        lease = self.rt.settings.send_lease
        now = self.rt.clock()
        if held - now > lease / 2:
            return held
        until = now + lease
        ids = [r.id for r in rest if r.id not in lost]
        with self.rt.engine.begin() as conn:
            kept = renew_lease(conn, ids, held, until)
        if len(kept) < len(ids):
            log.warning("lease lost on %d messages: another worker has them",
                        len(ids) - len(kept))
            lost.update(set(ids) - kept)
        return until

    def _send_slice(
        self, to_send: list[Row[Any]], topic_info: dict[str, Any], report: Report,
        shared: Mapping[str, Mapping[str, Any]], locales: Mapping[str, str | None],
    ) -> None:
        now = self.rt.clock()
        envelopes: list[Envelope] = []
        sendable: list[Row[Any]] = []
        failed_render: list[Outcome] = []
        for row in to_send:
            try:
                envelopes.append(self._build(row, topic_info, now, shared,
                                             locales.get(row.id)))
                sendable.append(row)
            except MailerError as exc:
                # The template changed since acceptance and no longer renders: permanent.
                failed_render.append(
                    Outcome(row.id, MessageStatus.FAILED, reason="render_error",
                            smtp_response=str(exc)[:500])
                )
        results = self.transport.send_many(envelopes) if envelopes else []

        done = self.rt.clock()
        outcomes = failed_render + [
            self._outcome(row, result, done) for row, result in zip(sendable, results, strict=True)
        ]
        with self.rt.engine.begin() as conn:
            finish(conn, outcomes, done)
            for row, result in zip(sendable, results, strict=True):
                if result.outcome is SmtpOutcome.FAILED and result.is_user_unknown and row.to_hash:
                    # 5.1.x: the mailbox does not exist; suppress everything (SPEC 5).
                    add_suppression(
                        conn, None, row.to_hash, "all", "hard_bounce", f"smtp:{row.id}", done
                    )
        retry = [o for o in outcomes if o.status == MessageStatus.DEFERRED]
        for o in retry:
            assert o.next_attempt_at is not None
            delay = max(int((o.next_attempt_at - done).total_seconds() * 1000), 0)
            self.rt.enqueuer.enqueue([o.id], delay_ms=delay)
        for o in outcomes:
            report.outcomes[o.status] = report.outcomes.get(o.status, 0) + 1

    def _outcome(self, row: Row[Any], result: SendResult, now: datetime) -> Outcome:
        code, text = result.code, result.response[:500]
        if result.outcome is SmtpOutcome.SENT:
            return Outcome(row.id, MessageStatus.SENT, smtp_code=code, smtp_response=text)
        if result.outcome is SmtpOutcome.UNKNOWN:
            # The server may hold it already (RFC 5321 6.1): resending risks a duplicate,
            # so we say what we know and let a person or a bounce webhook settle it.
            return Outcome(row.id, MessageStatus.UNKNOWN, smtp_code=code, smtp_response=text)
        if result.outcome is SmtpOutcome.FAILED:
            return Outcome(row.id, MessageStatus.FAILED, reason="smtp_rejected", smtp_code=code,
                           smtp_response=text)
        # SPEC 5: a relay that refuses *us* is retried, never failed for the recipient;
        # a throttled or held-back domain waits as a group for the time the pace names.
        reason = "relay_error" if result.relay_error else None
        if result.retry_after is not None:
            reason = reason or "throttled"
            retry_at = now + timedelta(seconds=result.retry_after * random.uniform(1.0, 1.2))
        else:
            retry_at = now + backoff(row.attempts, self.retry_base)
        if retry_at - row.created_at > MAX_AGE[Category(row.category)]:
            return Outcome(row.id, MessageStatus.FAILED, reason="expired", smtp_code=code,
                           smtp_response=text)
        # Held back by our relay or the pace, not refused for the recipient: this attempt
        # does not count toward MAILER_MAX_ATTEMPTS (whose job is to stop a message that
        # kills its worker); the category's age limit above still ends it. Kept just below
        # the cap, so the backoff stays at its longest.
        held_back = result.relay_error or result.retry_after is not None
        cap = self.rt.settings.max_attempts - 1 if held_back else None
        return Outcome(row.id, MessageStatus.DEFERRED, reason=reason, smtp_code=code,
                       smtp_response=text, next_attempt_at=retry_at, attempts_at_most=cap)

    def _build(self, row: Row[Any], topic_info: dict[str, Any], now: datetime,
               shared: Mapping[str, Mapping[str, Any]], wanted: str | None = None) -> Envelope:
        default_locale = self.rt.settings.default_locale
        # SPEC 14: the message's locale, else the recipient's, picks the version.
        chosen = self.rt.catalogue.get(row.template)
        template, language = chosen.localised(wanted, default_locale)
        data = row.data or {}
        common: frozenset[str] = frozenset()
        if row.campaign_id:
            # The campaign's data first; the recipient's profile fields win over it.
            common = frozenset(shared.get(row.campaign_id, {})) - set(data)
            data = {**shared.get(row.campaign_id, {}), **data}
        if row.recipient_id is not None and "preferences_url" not in data and \
                "preferences_url" in chosen.variables:
            # Any template may offer the person their preference centre (the policy_update
            # notice must: SPEC 14), bound to the address this mail goes to (SPEC 3).
            token = self.rt.signer.sign("p", row.recipient_id, email_hash=row.to_hash)
            data = {**data, "preferences_url": self.rt.url(f"/preferences/{token}")}
        # A campaign's messages share all but their personal fields: render the version
        # once per fixed data and fill those in (mailer.mail.stencil says when it is safe).
        rendered: Rendered = (
            template.render_reused(data, self.stencils, language=language, common=common)
            if self.reuse_renders else template.render(data, language=language))
        extra: list[tuple[str, str]] = []
        if row.category == Category.PROMOTION.value:
            footer_language = self.rt.catalogue.messages.language_for(wanted, default_locale)
            rendered, extra = self._promotion_parts(row, rendered, topic_info[row.topic],
                                                    footer_language)
        envelope = self.builder.build(
            to_email=row.to_email,
            to_name=row.to_name,
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            message_id=row.message_id_header,
            date=now,
            extra_headers=extra,
            content_language=language,
        )
        return replace(envelope, sender=self._envelope_sender(row.id, envelope.sender))

    def _envelope_sender(self, row_id: str, from_address: str) -> str:
        """MAIL FROM (SPEC 6): ``bounces+TOKEN@`` the inbound domain, else
        ``MAILER_RETURN_PATH``, else the From address."""
        if self.inbound is not None:
            verp = self.inbound.bounce_address(row_id)
            if verp is not None:
                return verp
        return self.rt.settings.return_path or from_address

    def _promotion_parts(
        self, row: Row[Any], rendered: Rendered, topic: Row[Any], language: str,
    ) -> tuple[Rendered, list[tuple[str, str]]]:
        """Footer and RFC 8058/2369/2919 headers that every promotion carries (SPEC 6)."""
        signer = self.rt.signer
        # Both links are bound to the address this mail goes to: from it they may grant
        # consent only while that is still the profile's address (SPEC 3).
        mailed = row.to_hash
        unsubscribe = self.rt.url(f"/u/{signer.sign('u', row.recipient_id, row.topic, mailed)}")
        preferences = self.rt.url(
            f"/preferences/{signer.sign('p', row.recipient_id, email_hash=mailed)}")
        # RFC 2369 mailto:, answered by the inbound listener (SPEC 6, 12); the token names
        # the profile and the topic, as the /u/ link does.
        mailto = (
            f"mailto:{self.inbound.unsubscribe_address(row.recipient_id, row.topic)}"
            "?subject=unsubscribe" if self.inbound is not None else None
        )
        links = PromotionLinks(unsubscribe=unsubscribe, preferences=preferences,
                               unsubscribe_mailto=mailto)
        # SPEC 14: the footer, and the topic's title in it, in the recipient's language.
        title = translated(topic.title, topic.translations, "title", language)
        rendered = add_footer(self.rt.catalogue.footer, rendered, topic_title=title,
                              links=links, postal_address=self.rt.settings.postal_address or "",
                              language=language, reuse=self.reuse_renders)
        return rendered, list_headers(row.topic, self.rt.mail_domain, links)
