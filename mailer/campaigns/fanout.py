"""Fan-out: turn a running campaign's audience into outbox rows, one batch at a time.

The audience is streamed by a keyset cursor on ``recipients.id`` (never loaded whole) up
to the highest id at the moment the campaign started, so the audience is a snapshot. Per
batch, the policy is applied with a few ``IN`` queries (:func:`mailer.store.facts.load_states`),
the messages are inserted in bulk, and the cursor advances by compare-and-set in the same
transaction: a batch is written exactly once however many schedulers run or restart.

The worker decides again right before SMTP, so an unsubscribe that lands after the
fan-out still wins (SPEC 2).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    and_,
    cast,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.expression import FromClause

from mailer.campaigns import lifecycle as model
from mailer.errors import ValidationFailed
from mailer.mail.stored import install, template_variables
from mailer.mail.templates import Template
from mailer.runtime import Runtime
from mailer.store.facts import Target, load_states
from mailer.store.outbox import insert_messages
from mailer.store.schema import campaigns, messages, recipients, topics
from suppression.policy import Category, Decision, Limits, Topic, decide

log = logging.getLogger(__name__)

#: Recipients read per batch: the IN-lists of the policy queries stay at a size measured
#: to be fast on both databases (reference performance.md, B4).
DEFAULT_BATCH = 500
#: How long one scheduler tick may fan out before the sweeper gets its turn.
DEFAULT_BUDGET = timedelta(seconds=2)
#: Largest ``audience`` filter accepted (keys x scalar values).
MAX_FILTER_KEYS = 20

_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
Scalar = str | int | float | bool | None


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` and ``"1"`` is not ``1``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class AudienceFilter:
    """``{"attributes": {key: value}}``: recipients whose attributes equal every value."""

    attributes: Mapping[str, Scalar] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> AudienceFilter:
        """Validate the API's ``audience`` object; 422 ``invalid_audience`` when malformed."""
        def refuse(message: str) -> ValidationFailed:
            return ValidationFailed(message, code="invalid_audience")

        if not raw:
            return cls()
        if set(raw) - {"attributes"}:
            raise refuse("audience supports only {\"attributes\": {...}}")
        attributes = raw.get("attributes") or {}
        if not isinstance(attributes, Mapping) or len(attributes) > MAX_FILTER_KEYS:
            raise refuse(f"audience.attributes must be an object of at most "
                         f"{MAX_FILTER_KEYS} keys")
        for key, value in attributes.items():
            if not _KEY.match(key):
                raise refuse("attribute names use letters, digits, - and _ (at most 64)")
            if not isinstance(value, str | int | float | bool) and value is not None:
                raise refuse("attribute values to match must be strings, numbers, "
                             "booleans or null")
        return cls(dict(attributes))

    def matches(self, attributes: Mapping[str, Any] | None) -> bool:
        """The same test in Python, for databases without JSON functions."""
        values = attributes or {}
        return all(key in values and _same(values[key], want)
                   for key, want in self.attributes.items())

    def clauses(self, table: FromClause, dialect: str) -> list[ColumnElement[bool]]:
        """SQL conditions for ``table`` (recipients or an alias), or [] if not expressible."""
        if not self.attributes:
            return []
        column = table.c.attributes
        if dialect == "postgresql":
            # jsonb containment of scalars is typed equality, and needs no casts per key.
            return [cast(column, JSONB).contains(dict(self.attributes))]
        if dialect == "sqlite":
            out: list[ColumnElement[bool]] = []
            for key, want in self.attributes.items():
                path = f'$."{key}"'
                kind = func.json_type(column, path)
                value = func.json_extract(column, path)
                if want is None:
                    out.append(kind == "null")
                elif isinstance(want, bool):
                    out.append(kind == ("true" if want else "false"))
                elif isinstance(want, int | float):
                    out.append(and_(kind.in_(("integer", "real")), value == want))
                else:
                    out.append(and_(kind == "text", value == want))
            return out
        return []

    def in_sql(self, dialect: str) -> bool:
        """Whether :meth:`clauses` does the whole job on this database."""
        return not self.attributes or dialect in ("postgresql", "sqlite")


def batch_size(rate_per_minute: int | None, default: int = DEFAULT_BATCH) -> int:
    """Recipients per batch: about one second's worth when the campaign is rate-limited."""
    if not rate_per_minute:
        return default
    return max(1, min(default, rate_per_minute // 60))


def audience_count(conn: Connection, flt: AudienceFilter, upto: int) -> int:
    """Distinct addresses among recipients up to ``upto`` that match the filter."""
    dialect = conn.dialect.name
    query = select(func.count(func.distinct(recipients.c.email_hash))).where(
        recipients.c.id <= upto, *flt.clauses(recipients, dialect))
    if flt.in_sql(dialect):
        return int(conn.execute(query).scalar_one())
    # Other databases: count per streamed batch (approximate: duplicates counted twice).
    total, after = 0, 0
    while True:
        rows = conn.execute(select(recipients.c.id, recipients.c.attributes)
                            .where(recipients.c.id > after, recipients.c.id <= upto)
                            .order_by(recipients.c.id).limit(DEFAULT_BATCH)).all()
        if not rows:
            return total
        total += sum(1 for r in rows if flt.matches(r.attributes))
        after = rows[-1].id


_PROFILE = (recipients.c.id, recipients.c.email, recipients.c.email_hash, recipients.c.name,
            recipients.c.attributes)


def _audience_batch(
    conn: Connection, flt: AudienceFilter, after: int, upto: int, limit: int,
    *, first_of_address: bool = False,
) -> tuple[list[Row[Any]], int]:
    """The next matching recipients after ``after`` and the cursor to continue from."""
    dialect = conn.dialect.name
    where = [recipients.c.id > after, recipients.c.id <= upto, *flt.clauses(recipients, dialect)]
    if first_of_address:
        # Only the lowest id of each address: the one the fan-out sends to.
        other = recipients.alias("other")
        where.append(~exists().where(
            other.c.email_hash == recipients.c.email_hash, other.c.id < recipients.c.id,
            *flt.clauses(other, dialect)))
    rows: list[Row[Any]] = list(conn.execute(
        select(*_PROFILE).where(*where).order_by(recipients.c.id).limit(limit)))
    cursor = rows[-1].id if rows else upto
    if not flt.in_sql(dialect):
        rows = [r for r in rows if flt.matches(r.attributes)]
    return rows, cursor


def _topic(conn: Connection, name: str) -> Topic:
    row = conn.execute(select(topics.c.name, topics.c.third_party)
                       .where(topics.c.name == name)).first()
    if row is None:
        raise ValidationFailed(f"unknown topic {name!r}", code="unknown_topic")
    return Topic(row.name, bool(row.third_party))


def _decide(rt: Runtime, conn: Connection, topic: Topic, rows: Sequence[Row[Any]],
            now: datetime) -> list[Decision]:
    """The SPEC 2 decision for each recipient of a batch, with one query per kind of fact."""
    targets = [
        Target(key=str(r.id), category=Category.PROMOTION, topic=topic.name,
               recipient_id=r.id, to_hash=r.email_hash, template="")
        for r in rows
    ]
    settings = rt.settings
    states = load_states(conn, targets, now, settings.service_alert_window)
    limits = Limits(settings.service_alert_limit, settings.service_alert_window)
    return [decide(Category.PROMOTION, topic, states[t.key], now, limits) for t in targets]


def message_data(row: Row[Any], variables: frozenset[str] | None) -> dict[str, Any]:
    """The per-recipient variables a message stores: only the profile fields it reads.

    The campaign's shared ``data`` is not copied into each row; the worker merges it in
    at render time (a 5 kB body times 200 000 recipients would be a gigabyte).
    """
    wanted = variables if variables is not None else frozenset({"name", "email", "attributes"})
    data: dict[str, Any] = {}
    if "name" in wanted and row.name:
        data["name"] = row.name
    if "email" in wanted:
        data["email"] = row.email
    if "attributes" in wanted:
        data["attributes"] = dict(row.attributes or {})
    return data


@dataclass
class BatchResult:
    """What one fan-out step did."""

    written: int = 0
    queued: int = 0
    advanced: bool = False  # the cursor moved (a batch of duplicates writes nothing)
    done: bool = False
    waiting_until: datetime | None = None
    stopped: bool = False  # the campaign is not running (paused, cancelled) or lost a race


def fan_out_batch(rt: Runtime, campaign_id: str, batch: int = DEFAULT_BATCH) -> BatchResult:
    """Write and enqueue the next batch of a running campaign."""
    now = rt.clock()
    with rt.engine.connect() as conn:
        name = model.get(conn, campaign_id).template
    # Looked up before the write transaction: a stored template is read on a connection
    # of its own, which on SQLite would wait for our write lock.
    template = rt.catalogue.get(name)
    queued: list[str] = []
    with rt.engine.begin() as conn:
        c = model.get(conn, campaign_id)
        if c.status != "running" or c.fanned_out_at is not None:
            return BatchResult(stopped=True)
        if c.next_batch_at is not None and c.next_batch_at > now:
            return BatchResult(waiting_until=c.next_batch_at)
        flt = AudienceFilter.parse(c.audience)
        rows, cursor = _audience_batch(conn, flt, c.last_recipient_id, c.max_recipient_id or 0,
                                       batch_size(c.rate_per_minute, batch))
        guard = and_(campaigns.c.id == campaign_id, campaigns.c.status == "running",
                     campaigns.c.last_recipient_id == c.last_recipient_id)
        if not rows:
            # The snapshot is exhausted: the exact audience is what was written.
            conn.execute(update(campaigns).where(guard).values(
                last_recipient_id=cursor, fanned_out_at=now, audience_count=c.written,
                updated_at=now))
            return BatchResult(done=True)
        rows = _first_per_address(conn, campaign_id, rows)
        topic = _topic(conn, c.topic)
        decisions = _decide(rt, conn, topic, rows, now)
        message_rows = _message_rows(rt, c, template, rows, decisions, now)
        queued = [m["id"] for m in message_rows if m["status"] == "queued"]
        pause_for = timedelta(0)
        if c.rate_per_minute:
            # Pace by messages that will be sent; suppressed ones cost the relay nothing.
            pause_for = timedelta(seconds=len(queued) * 60 / c.rate_per_minute)
        # Compare-and-set first: on PostgreSQL this also locks the campaign row, so a
        # pause either waits for this batch and then holds it, or wins and refuses it.
        moved = conn.execute(update(campaigns).where(guard).values(
            last_recipient_id=cursor, written=campaigns.c.written + len(message_rows),
            next_batch_at=now + pause_for if pause_for else None, updated_at=now))
        if not moved.rowcount:
            return BatchResult(stopped=True)
        insert_messages(conn, message_rows, now)
    if queued:
        # After commit (SPEC 5): a lost enqueue is re-sent by the outbox sweeper.
        rt.enqueuer.enqueue(queued)
    return BatchResult(written=len(message_rows), queued=len(queued), advanced=True)


def _first_per_address(conn: Connection, campaign_id: str,
                       rows: Sequence[Row[Any]]) -> list[Row[Any]]:
    """Drop a recipient whose address already has a message in this campaign."""
    hashes = sorted({r.email_hash for r in rows})
    seen = {r.to_hash for r in conn.execute(
        select(messages.c.to_hash).where(messages.c.campaign_id == campaign_id,
                                         messages.c.to_hash.in_(hashes)))}
    kept = []
    for row in rows:  # ordered by id: the oldest profile of an address is the one kept
        if row.email_hash not in seen:
            seen.add(row.email_hash)
            kept.append(row)
    return kept


def _message_rows(
    rt: Runtime, c: Row[Any], template: Template, rows: Sequence[Row[Any]],
    decisions: Sequence[Decision], now: datetime,
) -> list[dict[str, Any]]:
    variables = template_variables(rt.catalogue, template)
    needs_name = "name" in template.required and "name" not in (c.data or {})
    out = []
    for row, decision in zip(rows, decisions, strict=True):
        row_id, message_id = rt.new_message_id()
        status, reason = "queued", None
        if not decision.allowed:
            status, reason = "suppressed", decision.reason.value if decision.reason else None
        elif needs_name and not row.name:
            # A template that requires a name is never sent with a blank one.
            status, reason = "failed", "missing_variable"
        out.append({
            "id": row_id, "api_key_id": c.api_key_id, "campaign_id": c.id,
            "category": Category.PROMOTION.value, "template": c.template, "topic": c.topic,
            "recipient_id": row.id, "to_email": row.email, "to_name": row.name,
            "to_hash": row.email_hash, "data": message_data(row, variables), "status": status,
            "reason": reason, "attempts": 0, "message_id_header": message_id,
            "created_at": now, "updated_at": now, "send_at": None,
        })
    return out


def start_due(rt: Runtime) -> tuple[list[str], list[str]]:
    """Start every due campaign exactly once; mark those found too late. Return both."""
    now = rt.clock()
    lateness = rt.settings.campaign_max_lateness
    started: list[str] = []
    late: list[str] = []
    with rt.engine.connect() as conn:
        due = conn.execute(
            select(campaigns.c.id, campaigns.c.send_at, campaigns.c.allow_late,
                   campaigns.c.audience)
            .where(campaigns.c.status == "scheduled", campaigns.c.send_at <= now)
            .order_by(campaigns.c.send_at)
        ).all()
    for c in due:
        with rt.engine.begin() as conn:
            guard = and_(campaigns.c.id == c.id, campaigns.c.status == "scheduled")
            if not c.allow_late and now - c.send_at > lateness:
                # SPEC 9: never sent silently late; it waits for an explicit resume.
                result = conn.execute(update(campaigns).where(guard).values(
                    status="paused", late=True, paused_at=now, updated_at=now))
                if result.rowcount:
                    late.append(c.id)
                continue
            upto = conn.execute(select(func.coalesce(func.max(recipients.c.id), 0))
                                ).scalar_one()
            size = audience_count(conn, AudienceFilter.parse(c.audience), upto)
            # The one compare-and-set that starts a campaign: of two schedulers (or one
            # restarted mid-way) exactly one sees rowcount 1.
            result = conn.execute(update(campaigns).where(guard).values(
                status="running", started_at=now, max_recipient_id=upto,
                audience_count=size, last_recipient_id=0, written=0, next_batch_at=None,
                updated_at=now))
            if result.rowcount:
                started.append(c.id)
    return started, late


@dataclass
class TickReport:
    """What one scheduler tick did for campaigns."""

    started: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    written: int = 0
    busy: bool = False  # stopped by the time budget with work left


def tick(rt: Runtime, budget: timedelta = DEFAULT_BUDGET, batch: int = DEFAULT_BATCH
         ) -> TickReport:
    """The scheduler's campaign job: start, fan out round-robin within ``budget``, complete."""
    install(rt)
    report = TickReport()
    report.started, report.late = start_due(rt)
    with rt.engine.connect() as conn:
        active = [r.id for r in conn.execute(
            select(campaigns.c.id)
            .where(campaigns.c.status == "running", campaigns.c.fanned_out_at.is_(None))
            .order_by(campaigns.c.started_at))]
    deadline = time.monotonic() + budget.total_seconds()
    while active:
        progressed = []
        for campaign_id in active:
            if time.monotonic() > deadline:
                report.busy = True
                break
            try:
                result = fan_out_batch(rt, campaign_id, batch)
            except Exception as exc:  # one broken campaign must not stop the others
                log.warning("fan-out of campaign %s failed: %s", campaign_id,
                            type(exc).__name__)
                continue
            report.written += result.written
            if result.advanced:
                progressed.append(campaign_id)
        if report.busy:
            break
        active = progressed
    with rt.engine.begin() as conn:
        strays = model.release_strays(conn, rt.clock())
        report.completed = model.complete_finished(conn, rt.clock())
    if strays:
        rt.enqueuer.enqueue(strays)
    return report


@dataclass(frozen=True)
class Eligibility:
    """How many of an audience may receive the campaign now, and why the rest may not."""

    audience: int
    eligible: int
    excluded: dict[str, int]


def eligibility(rt: Runtime, campaign: Row[Any], batch: int = DEFAULT_BATCH) -> Eligibility:
    """Decide the whole audience as the fan-out would, streaming; nothing is written."""
    excluded: Counter[str] = Counter()
    eligible = 0
    flt = AudienceFilter.parse(campaign.audience)
    with rt.engine.connect() as conn:
        upto = campaign.max_recipient_id
        if upto is None:
            upto = conn.execute(select(func.coalesce(func.max(recipients.c.id), 0))
                                ).scalar_one()
        topic = _topic(conn, campaign.topic)
    after = 0
    while True:
        # A connection per batch: on SQLite every transaction holds the write lock, and
        # a preview of a large audience must not stall the workers for its whole length.
        with rt.engine.connect() as conn:
            rows, after = _audience_batch(conn, flt, after, upto, batch, first_of_address=True)
            if not rows:
                break
            decisions = _decide(rt, conn, topic, rows, rt.clock())
        for decision in decisions:
            if decision.allowed:
                eligible += 1
            else:
                excluded[decision.reason.value if decision.reason else "unknown"] += 1
    return Eligibility(eligible + sum(excluded.values()), eligible, dict(sorted(excluded.items())))


def encoded_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (campaign data is stored once, but bounded)."""
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


