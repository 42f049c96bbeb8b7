"""Double opt-in: a grant waits for a click on a link mailed to the address (SPEC 3).

A grant from a form or a service for a ``double_opt_in`` topic is only pending: it becomes
a ledger grant when the person clicks the confirmation link mailed to the profile's
address, which shows control of that mailbox. The link confirms only while that is still
the profile's address ("Consent belongs to an address"), and confirmation mails are
limited per address per day so that a signup form cannot be used to mail-bomb someone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select, update

from mailer.keys import ApiKey
from mailer.mail.locales import translated
from mailer.preferences.tokens import Token
from mailer.runtime import Runtime
from mailer.sending.accept import Acceptor, Refused, SendRequest
from mailer.store.recipients import (
    get_recipient,
    preferences,
    recipient_by_id,
    record_consent,
    refuse_silent_resubscription,
    topic_row,
)
from mailer.store.schema import consent_requests, messages
from mailer.store.status import MessageStatus
from mailer.times import iso
from suppression.consent import THIRD_PARTY_SHARING

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

@dataclass(frozen=True)
class PendingGrant:
    """A grant waiting for confirmation, and what became of its confirmation mail."""

    request_id: int
    #: ``queued`` (mail accepted), ``rate_limited``, ``suppressed`` or ``failed``.
    confirmation: str
    message_id: str | None = None


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
            refuse_silent_resubscription(conn, recipient.id, topic, source,
                                         has_evidence=bool(evidence))
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
            row = topic_row(conn, topic)
            # SPEC 14: the title in the language the confirmation mail is written in.
            title = translated(row.title, row.translations, "title",
                               recipient.locale or self.rt.settings.default_locale)
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
                messages.c.status.not_in((MessageStatus.SUPPRESSED, MessageStatus.CANCELLED)),
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
        if isinstance(result, Refused):
            log.warning("double opt-in mail for request %s not accepted: %s",
                        request_id, result.error.code)
            return PendingGrant(request_id, "failed")
        with self.rt.engine.begin() as conn:
            conn.execute(update(consent_requests)
                         .where(consent_requests.c.id == request_id)
                         .values(message_id=result.id))
        suppressed = result.status is MessageStatus.SUPPRESSED
        return PendingGrant(request_id, "suppressed" if suppressed else "queued", result.id)

    def may_grant(self, conn: Connection, token: Token) -> str | None:
        """None when ``token`` may grant now; else why not: ``wrong_address`` or ``unbound``.

        ``unbound`` is a link minted before links were bound to addresses: it cannot say
        which mailbox it reached, so it confirms nothing (the person signs up again).
        """
        recipient = recipient_by_id(conn, token.recipient_id)
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
            recipient = recipient_by_id(conn, recipient_id)
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
                "requested_at": iso(latest.requested_at),
                "request_source": latest.source,
                "request_evidence": latest.evidence,
                **dict(evidence or {}),
            }
            record_consent(conn, recipient, topic, True, "double_opt_in",
                           latest.policy_version, now, now, proof)
        return "confirmed"
