"""Time as this service keeps it: aware UTC inside, ISO 8601 with ``Z`` on the wire."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import overload


def utcnow() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: None) -> None: ...
@overload
def iso(value: datetime | None) -> str | None: ...
def iso(value: datetime | None) -> str | None:
    """An aware UTC time as ISO 8601 with ``Z`` (RFC 3339 section 5.6); None stays None."""
    return value.isoformat().replace("+00:00", "Z") if value else None
