"""UtcDateTime's one-step SQLite bind writes what SQLAlchemy's own chain writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import DateTime

from mailer.store.schema.base import UtcDateTime

_SQLITE = sqlite.dialect()
# SQLAlchemy's own path: the conversion to naive UTC, then SQLite DATETIME's text form.
_REFERENCE = DateTime().dialect_impl(_SQLITE).bind_processor(_SQLITE)
_OURS = UtcDateTime().bind_processor(_SQLITE)

_ZONES = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes)))


@given(st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31),
                    timezones=_ZONES | st.just(UTC)))
def test_sqlite_bind_equals_the_chained_processors(value: datetime) -> None:
    assert _REFERENCE is not None and _OURS is not None
    expected = _REFERENCE(value.astimezone(UTC).replace(tzinfo=None))
    assert _OURS(value) == expected


def test_naive_and_none() -> None:
    assert _OURS is not None
    assert _OURS(None) is None
    # A fresh processor's first value may be None too: NULL, never a remembered text
    fresh = UtcDateTime().bind_processor(_SQLITE)
    assert fresh is not None and fresh(None) is None
    with pytest.raises(ValueError, match="naive"):
        _OURS(datetime(2030, 1, 1))


def test_other_dialects_keep_the_chain() -> None:
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    process = UtcDateTime()._cached_bind_processor(dialect)
    moment = datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    converted = process(moment) if process is not None else moment
    assert converted == datetime(2030, 1, 1, 10)


def test_round_trip_and_order_on_sqlite() -> None:
    engine = create_engine("sqlite://")
    table = Table("t", MetaData(), Column("id", Integer, primary_key=True),
                  Column("at", UtcDateTime()))
    table.metadata.create_all(engine)
    moments = [datetime(2030, 1, 1, 0, 0, 0, tzinfo=UTC),  # no microseconds
               datetime(2030, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
               datetime(2030, 1, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))]
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": i, "at": m} for i, m in enumerate(moments)])
        back = conn.execute(select(table.c.at).order_by(table.c.id)).scalars().all()
        ordered = conn.execute(select(table.c.id).order_by(table.c.at)).scalars().all()
        later = conn.execute(select(table.c.id).where(
            table.c.at > datetime(2030, 1, 1, tzinfo=UTC))).scalars().all()
    assert back == moments
    assert ordered == [2, 0, 1]
    assert later == [1]


def test_a_repeated_moment_binds_alike_and_a_new_one_is_converted() -> None:
    # Given one processor binding the same object many times, then other moments
    process = UtcDateTime().bind_processor(_SQLITE)
    assert process is not None and _REFERENCE is not None
    now = datetime(2030, 5, 6, 7, 8, 9, 10, tzinfo=UTC)
    assert {process(now) for _ in range(3)} == {"2030-05-06 07:08:09.000010"}
    # Then an equal but distinct moment in another zone, and a naive one, are still handled
    same = now.astimezone(timezone(timedelta(hours=-3)))
    assert process(same) == "2030-05-06 07:08:09.000010"
    assert process(now + timedelta(microseconds=1)) == "2030-05-06 07:08:09.000011"
    with pytest.raises(ValueError, match="naive"):
        process(now.replace(tzinfo=None))
    assert process(now) == _REFERENCE(now.replace(tzinfo=None))
