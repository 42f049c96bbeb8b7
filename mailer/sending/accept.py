"""Accepting messages: validate, sort into a category, decide, write the outbox row.

The decision here lets the caller see ``suppressed`` at once; the worker decides again
just before the SMTP transaction, and that second decision is the one that counts.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select
from sqlalchemy.exc import IntegrityError

from mailer.errors import (
    Conflict,
    Forbidden,
    InvalidAddress,
    RequestError,
    ValidationFailed,
)
from mailer.keys import ApiKey
from mailer.mail.headers import check_header_value
from mailer.mail.locales import normalise as normalise_locale
from mailer.mail.templates import Template
from mailer.runtime import Runtime
from mailer.sending.compliance import require_postal_address
from mailer.store.facts import Target, load_states
from mailer.store.outbox import insert_messages
from mailer.store.schema import idempotency_keys, recipients, topics
from mailer.store.status import MessageStatus
from suppression.addresses import InvalidAddressError
from suppression.policy import Category, Decision, Limits, Reason, Topic, decide

#: Which scope sends which category (SPEC 7).
SCOPE_FOR = {
    Category.REGISTRATION_CONFIRMATION: "messages:transactional",
    Category.SERVICE_ALERT: "messages:transactional",
    Category.LEGAL_NOTICE: "messages:legal",
    Category.PROMOTION: "marketing",
}
#: How long an idempotency key is remembered (SPEC 5).
IDEMPOTENCY_TTL = timedelta(hours=24)
#: Most messages in one batch request (SPEC 7).
MAX_BATCH = 1000


@dataclass(frozen=True)
class SendRequest:
    """One message as a caller asked for it."""

    template: str
    email: str
    external_id: str | None = None
    name: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    topic: str | None = None
    idempotency_key: str | None = None
    send_at: datetime | None = None
    body: Mapping[str, Any] = field(default_factory=dict)
    #: SPEC 14: the language version wanted, over the recipient's own locale.
    locale: str | None = None

    def fingerprint(self) -> str:
        """A hash of the request body without its idempotency key."""
        payload = {k: v for k, v in self.body.items() if k != "idempotency_key"}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


def error_body(exc: RequestError) -> dict[str, Any]:
    """The SPEC's error object for ``exc``."""
    return {"code": exc.code, "message": exc.message, "details": exc.details}


@dataclass(frozen=True)
class Accepted:
    """A message written to the outbox: queued, scheduled, or suppressed with a reason."""

    id: str
    status: MessageStatus
    category: Category
    reason: Reason | None = None

    def as_json(self) -> dict[str, Any]:
        """The SPEC 7 body of a 202: ``{"id", "status", "category"[, "reason"]}``."""
        body: dict[str, Any] = {"id": self.id, "status": self.status.value,
                                "category": self.category.value}
        if self.reason is not None:
            body["reason"] = self.reason.value
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Accepted:
        """The result an idempotency key stored (its :meth:`as_json`)."""
        reason = body.get("reason")
        return cls(id=body["id"], status=MessageStatus(body["status"]),
                   category=Category(body["category"]),
                   reason=Reason(reason) if reason is not None else None)


@dataclass(frozen=True)
class Refused:
    """A request nothing was written for, and the 4xx error that says why."""

    error: RequestError

    def as_json(self) -> dict[str, Any]:
        """The SPEC error body: ``{"error": {"code", "message", "details"}}``."""
        return {"error": error_body(self.error)}


#: What accepting one request gives back.
AcceptResult = Accepted | Refused


@dataclass
class _Prepared:
    index: int
    request: SendRequest
    template: Template
    category: Category
    topic: str | None
    email: str
    to_hash: str
    recipient_id: int | None = None
    #: The linked profile's name, for the To of a caller who gave none (SPEC 6).
    profile_name: str | None = None


# Built once, not per request (each select built and keyed costs about 200 us).
_BY_EXTERNAL_ID = select(
    recipients.c.id, recipients.c.external_id, recipients.c.email_hash, recipients.c.name
).where(recipients.c.external_id.in_(bindparam("keys", expanding=True)))
# Oldest first, so that of two profiles with one address the newest wins the dict.
_BY_HASH = (
    select(recipients.c.id, recipients.c.email_hash, recipients.c.name)
    .where(recipients.c.email_hash.in_(bindparam("keys", expanding=True)))
    .order_by(recipients.c.updated_at)
)
_TOPICS = select(topics.c.name, topics.c.third_party).where(
    topics.c.name.in_(bindparam("keys", expanding=True)))


class Acceptor:
    """Turns send requests into outbox rows, in one transaction per call."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def _prepare(self, key: ApiKey, index: int, req: SendRequest) -> _Prepared:
        template = self.rt.catalogue.get(req.template)
        category = template.category
        scope = SCOPE_FOR[category]
        if not key.allows(scope):
            raise Forbidden(f"this key may not send {category.value} messages (needs {scope})")
        topic = template.topic
        if category is Category.PROMOTION:
            if req.topic is not None and topic is not None and req.topic != topic:
                raise ValidationFailed(f"template {template.name!r} belongs to topic {topic!r}")
            topic = topic or req.topic
            if not topic:
                raise ValidationFailed("a promotion needs a topic", code="missing_topic")
            require_postal_address(self.rt.settings.postal_address)
        try:
            address = self.rt.address(req.email)
        except InvalidAddressError as exc:
            raise InvalidAddress(f"invalid recipient address: {exc}") from None
        if req.name is not None:
            check_header_value("to.name", req.name)
        # Render now so a missing variable is a 422 here, never a failure in the worker;
        # the worker renders again (with the text part) when it builds the message. The
        # version rendered is the one the message's locale asks for: the recipient's own
        # may pick another, which reads no variable the default does not (templates.py).
        version, language = template.localised(req.locale, self.rt.settings.default_locale)
        rendered = version.render(req.data, derive_text=False, language=language)
        check_header_value("subject", rendered.subject)
        return _Prepared(index, req, template, category, topic, address.email, address.hash)

    def accept(self, key: ApiKey, requests: Sequence[SendRequest]) -> list[AcceptResult]:
        """Accept each request; return, in the same order, :class:`Accepted` or :class:`Refused`."""
        refused: dict[int, AcceptResult] = {}
        prepared: list[_Prepared] = []
        for index, req in enumerate(requests):
            try:
                prepared.append(self._prepare(key, index, req))
            except RequestError as exc:
                refused[index] = Refused(exc)
        for attempt in range(3):
            outcomes: dict[int, AcceptResult] = dict(refused)
            try:
                queued = self._write(key, prepared, outcomes)
                break
            except IntegrityError:
                # A concurrent request took one of our idempotency keys; the next pass
                # finds and replays it.
                if attempt == 2:
                    raise
        if queued:
            self.rt.enqueuer.enqueue(queued)
        return [outcomes[index] for index in range(len(requests))]

    def _write(
        self, key: ApiKey, prepared: list[_Prepared], outcomes: dict[int, AcceptResult]
    ) -> list[str]:
        now = self.rt.clock()
        # Read and decide on a read-only snapshot, then write in a short transaction: on
        # SQLite the write lock is one for the whole database, and holding it while 500
        # requests are looked up and decided holds up every worker. What the snapshot
        # cannot see is caught at the write: an idempotency key stored meanwhile fails
        # the insert (IntegrityError), and the caller's next pass replays it.
        with self.rt.engine.connect() as conn:
            fresh = self._replay_idempotent(conn, key, prepared, outcomes, now)
            third_party = self._topics(conn, fresh, outcomes)
            fresh = [p for p in fresh if p.topic is None or p.topic in third_party]
            fresh = self._resolve_recipients(conn, fresh, outcomes)
            decisions = self._decide(conn, fresh, now, third_party)
        rows: list[dict[str, Any]] = []
        idem_rows: list[dict[str, Any]] = []
        queued: list[str] = []
        for p, decision, (row_id, message_id) in zip(
                fresh, decisions, self.rt.new_message_ids(len(fresh)), strict=True):
            req = p.request
            if not decision.allowed:
                status = MessageStatus.SUPPRESSED
            elif req.send_at is not None and req.send_at > now:
                status = MessageStatus.SCHEDULED
            else:
                status = MessageStatus.QUEUED
                queued.append(row_id)
            # An erased person's address is not written down again, not even on the
            # row that records why we did not send to it.
            erased = decision.reason is Reason.ERASED
            rows.append({
                "id": row_id, "api_key_id": key.id, "category": p.category.value,
                "template": p.template.name, "topic": p.topic,
                "recipient_id": p.recipient_id,
                "to_email": None if erased else p.email,
                # SPEC 6: the To carries the name when known; the profile's, unless the
                # caller named the person (the profile holds this very address).
                "to_name": None if erased else (req.name or p.profile_name),
                "to_hash": p.to_hash, "data": None if erased else dict(req.data),
                "status": status,
                "reason": decision.reason.value if decision.reason else None,
                "attempts": 0, "message_id_header": message_id, "created_at": now,
                "updated_at": now, "send_at": req.send_at,
                "locale": normalise_locale(req.locale),
            })
            result = Accepted(row_id, status, p.category, decision.reason)
            outcomes[p.index] = result
            if req.idempotency_key:
                idem_rows.append({
                    "api_key_id": key.id, "key": req.idempotency_key,
                    "request_hash": req.fingerprint(), "status_code": 202,
                    "response": result.as_json(), "created_at": now,
                })
        if not rows:
            return queued  # every request was refused or replayed: nothing to write
        with self.rt.engine.begin() as conn:
            if idem_rows:
                # Keys past their lifetime were read as unused: their names are free again.
                conn.execute(delete(idempotency_keys).where(
                    idempotency_keys.c.api_key_id == key.id,
                    idempotency_keys.c.key.in_(sorted(r["key"] for r in idem_rows)),
                    idempotency_keys.c.created_at < now - IDEMPOTENCY_TTL,
                ))
            insert_messages(conn, rows, now)
            if idem_rows:
                conn.execute(insert(idempotency_keys), idem_rows)
        return queued

    def _replay_idempotent(
        self,
        conn: Connection,
        key: ApiKey,
        prepared: list[_Prepared],
        outcomes: dict[int, AcceptResult],
        now: datetime,
    ) -> list[_Prepared]:
        """Answer repeated keys from the store; return the requests still to be written."""
        keyed = [p for p in prepared if p.request.idempotency_key]
        if not keyed:
            return prepared
        names = sorted({p.request.idempotency_key for p in keyed if p.request.idempotency_key})
        # A key past its lifetime counts as unused (the write removes it before reuse).
        stored = {
            row.key: row
            for row in conn.execute(
                select(idempotency_keys).where(
                    idempotency_keys.c.api_key_id == key.id, idempotency_keys.c.key.in_(names),
                    idempotency_keys.c.created_at >= now - IDEMPOTENCY_TTL,
                )
            )
        }
        fresh: list[_Prepared] = []
        seen: set[str] = set()
        for p in prepared:
            name = p.request.idempotency_key
            if name and (name in stored or name in seen):
                row = stored.get(name)
                if row is not None and row.request_hash == p.request.fingerprint():
                    outcomes[p.index] = Accepted.from_json(row.response)
                else:
                    outcomes[p.index] = Refused(Conflict(
                        "this idempotency key was used with a different request",
                        code="idempotency_conflict",
                    ))
                continue
            if name:
                seen.add(name)
            fresh.append(p)
        return fresh

    def _resolve_recipients(
        self, conn: Connection, prepared: list[_Prepared], outcomes: dict[int, AcceptResult]
    ) -> list[_Prepared]:
        """Link each message to a profile: by external id, else by address.

        Consent belongs to an address (SPEC 3): an ``external_id`` whose profile holds
        another address is a 409 ``recipient_mismatch`` and nothing is queued, or anyone's
        address could borrow that person's consent, and the links in the mail would act
        on their choices. Both sides are compared as keyed hashes of normalised addresses.
        """
        ext_ids = sorted({p.request.external_id for p in prepared if p.request.external_id})
        by_ext: dict[str, tuple[int, str, str | None]] = {}
        if ext_ids:
            for profile_row in conn.execute(_BY_EXTERNAL_ID, {"keys": ext_ids}):
                by_ext[profile_row.external_id] = (
                    profile_row.id, profile_row.email_hash, profile_row.name)
        hashes = sorted({p.to_hash for p in prepared if not p.request.external_id})
        by_hash: dict[str, tuple[int, str | None]] = {}
        if hashes:
            for row in conn.execute(_BY_HASH, {"keys": hashes}):
                by_hash[row.email_hash] = (row.id, row.name)
        resolved: list[_Prepared] = []
        for p in prepared:
            ext = p.request.external_id
            if not ext:
                p.recipient_id, p.profile_name = by_hash.get(p.to_hash, (None, None))
            elif ext in by_ext:
                p.recipient_id, profile_hash, p.profile_name = by_ext[ext]
                if profile_hash != p.to_hash:
                    outcomes[p.index] = Refused(Conflict(
                        "the address is not the one on this recipient's profile; update the "
                        "profile first (PUT /v1/recipients/{external_id})",
                        {"external_id": ext}, code="recipient_mismatch",
                    ))
                    continue
            resolved.append(p)
        return resolved

    @staticmethod
    def _topics(
        conn: Connection, prepared: list[_Prepared], outcomes: dict[int, AcceptResult]
    ) -> dict[str, bool]:
        """Topic name -> third_party for the topics named; unknown ones become 422s."""
        names = sorted({p.topic for p in prepared if p.topic})
        if not names:
            return {}
        known = {
            row.name: bool(row.third_party)
            for row in conn.execute(_TOPICS, {"keys": names})
        }
        for p in prepared:
            if p.topic and p.topic not in known:
                outcomes[p.index] = Refused(
                    ValidationFailed(f"unknown topic {p.topic!r}", code="unknown_topic"))
        return known

    def _decide(
        self,
        conn: Connection,
        prepared: list[_Prepared],
        now: datetime,
        third_party: Mapping[str, bool],
    ) -> list[Decision]:
        """Decide every message, counting earlier ones of the same batch as prior sends."""
        if not prepared:
            return []
        settings = self.rt.settings
        targets = [
            Target(
                key=str(p.index), category=p.category, topic=p.topic,
                recipient_id=p.recipient_id, to_hash=p.to_hash, template=p.template.name,
            )
            for p in prepared
        ]
        states = load_states(conn, targets, now, settings.service_alert_window)
        limits = Limits(settings.service_alert_limit, settings.service_alert_window)
        in_batch: dict[tuple[str, str], list[datetime]] = defaultdict(list)
        decisions = []
        for p, target in zip(prepared, targets, strict=True):
            state = states[target.key]
            counted = (p.to_hash, p.category.value)
            if in_batch[counted]:
                state = replace(state, prior_sends=(*state.prior_sends, *in_batch[counted]))
            topic = Topic(p.topic, third_party[p.topic]) if p.topic else None
            decision = decide(p.category, topic, state, now, limits)
            if decision.allowed and p.template.name != "consent_confirmation":
                in_batch[counted].append(now)
            decisions.append(decision)
        return decisions


__all__ = ["AcceptResult", "Accepted", "Acceptor", "Refused", "SendRequest", "error_body"]
