"""A campaign's audience: who matches its filter, how many, and who may receive it now.

The audience is every recipient whose ``attributes`` equal the filter's values, read in
batches by a keyset cursor on ``recipients.id`` (never loaded whole) up to a snapshot id.
Each batch is decided with the SPEC 2 policy using a few ``IN`` queries
(:func:`mailer.store.facts.load_states`); the eligibility preview does exactly what the
fan-out will do, and writes nothing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Row, and_, cast, exists, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.expression import FromClause

from mailer.errors import ValidationFailed
from mailer.runtime import Runtime
from mailer.store.facts import Target, load_states
from mailer.store.schema import recipients, topics
from suppression.policy import Category, Decision, Limits, Topic, decide

#: Recipients read per batch: the IN-lists of the policy queries stay at the size that
#: measured fastest on both databases (see :data:`mailer.store.facts._BATCH`).
DEFAULT_BATCH = 500
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
    """``{"attributes": {key: value}, "account_active": bool}``: recipients whose attributes
    equal every value (and whose account is, or is not, active)."""

    attributes: Mapping[str, Scalar] = field(default_factory=dict)
    #: Service-alert campaigns go to active accounts only (SPEC 2, 14).
    account_active: bool | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> AudienceFilter:
        """Validate the API's ``audience`` object; 422 ``invalid_audience`` when malformed."""
        def refuse(message: str) -> ValidationFailed:
            return ValidationFailed(message, code="invalid_audience")

        if not raw:
            return cls()
        if set(raw) - {"attributes", "account_active"}:
            raise refuse("audience supports only {\"attributes\": {...}, "
                         "\"account_active\": true|false}")
        active = raw.get("account_active")
        if active is not None and not isinstance(active, bool):
            raise refuse("audience.account_active must be true or false")
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
        return cls(dict(attributes), active)

    def as_json(self) -> dict[str, Any] | None:
        """The stored form of the filter (None when it matches everybody)."""
        out: dict[str, Any] = {}
        if self.attributes:
            out["attributes"] = dict(self.attributes)
        if self.account_active is not None:
            out["account_active"] = self.account_active
        return out or None

    def matches(self, attributes: Mapping[str, Any] | None) -> bool:
        """The same test in Python, for databases without JSON functions."""
        values = attributes or {}
        return all(key in values and _same(values[key], want)
                   for key, want in self.attributes.items())

    def clauses(self, table: FromClause, dialect: str) -> list[ColumnElement[bool]]:
        """SQL conditions for ``table`` (recipients or an alias); attribute conditions only
        where :meth:`in_sql` says the database can express them."""
        out: list[ColumnElement[bool]] = []
        if self.account_active is not None:
            out.append(table.c.account_active.is_(self.account_active))
        return out + self._attribute_clauses(table, dialect)

    def _attribute_clauses(self, table: FromClause, dialect: str) -> list[ColumnElement[bool]]:
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


def audience_batch(
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


def campaign_topic(conn: Connection, name: str | None) -> Topic | None:
    """The campaign's topic as the policy sees it; 422 ``unknown_topic`` if it is gone.

    None for a campaign without a topic (service alerts, SPEC 14).
    """
    if name is None:
        return None
    row = conn.execute(select(topics.c.name, topics.c.third_party)
                       .where(topics.c.name == name)).first()
    if row is None:
        raise ValidationFailed(f"unknown topic {name!r}", code="unknown_topic")
    return Topic(row.name, bool(row.third_party))


def decide_batch(rt: Runtime, conn: Connection, topic: Topic | None, rows: Sequence[Row[Any]],
                 now: datetime, category: Category = Category.PROMOTION) -> list[Decision]:
    """The SPEC 2 decision for each recipient of a batch, with one query per kind of fact.

    A service-alert campaign (a policy update) keeps that category's rules: active
    account, hard bounce, manual block, complaint and the frequency cap.
    """
    targets = [
        Target(key=str(r.id), category=category, topic=topic.name if topic else None,
               recipient_id=r.id, to_hash=r.email_hash, template="")
        for r in rows
    ]
    settings = rt.settings
    states = load_states(conn, targets, now, settings.service_alert_window)
    limits = Limits(settings.service_alert_limit, settings.service_alert_window)
    return [decide(category, topic, states[t.key], now, limits) for t in targets]


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
        topic = campaign_topic(conn, campaign.topic)
    category = Category(campaign.category)
    after = 0
    while True:
        # A connection per batch: one read snapshot held through the preview of a large
        # audience would keep SQLite from checkpointing its WAL (and PostgreSQL from
        # vacuuming) for its whole length.
        with rt.engine.connect() as conn:
            rows, after = audience_batch(conn, flt, after, upto, batch, first_of_address=True)
            if not rows:
                break
            decisions = decide_batch(rt, conn, topic, rows, rt.clock(), category)
        for decision in decisions:
            if decision.allowed:
                eligible += 1
            else:
                excluded[decision.reason.value if decision.reason else "unknown"] += 1
    return Eligibility(eligible + sum(excluded.values()), eligible, dict(sorted(excluded.items())))
