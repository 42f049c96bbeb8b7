"""What every table shares: one MetaData and :class:`UtcDateTime`, their datetime type.

The MetaData's naming convention names the constraints and indexes not named by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, MetaData
from sqlalchemy.types import TypeDecorator

#: What a fresh SQLite processor has bound last: no value is this object (None included).
_NOTHING_BOUND = object()


class UtcDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, so SQLite and PostgreSQL compare alike."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, the conversion above and then SQLAlchemy's text form in one call.

        SQLite's DATETIME stores ``YYYY-MM-DD HH:MM:SS.ffffff``, which ``isoformat`` writes
        in C; the two chained Python processors cost twice as much, on every timestamp of
        every row the API, scheduler and worker write. Other dialects keep the chain.
        """
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        # A batch binds the same "now" object in every row: the last conversion is kept,
        # as one pair replaced whole, so threads sharing the processor never see it torn.
        # The pair holds the datetime (immutable), so its identity cannot be reused.
        last: list[tuple[object, str | None]] = [(_NOTHING_BOUND, None)]

        def process(value: datetime | None) -> str | None:
            seen, text = last[0]
            if value is seen:
                return text
            naive = self.process_bind_param(value, dialect)
            if naive is None:
                return None
            text = naive.isoformat(" ", "microseconds")
            last[0] = (value, text)
            return text

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQL on SQLite may hand back text
            value = datetime.fromisoformat(value)
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)
