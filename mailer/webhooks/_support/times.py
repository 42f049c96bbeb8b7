"""Turn the timestamps providers send (ISO 8601, Unix seconds, RFC 5322 dates) into UTC."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from mailer.webhooks._support.errors import ParseError


def from_iso(text: object) -> datetime:
    """Parse an ISO 8601 timestamp such as SES's ``2012-05-25T14:59:38.605Z``; naive means UTC."""
    if not isinstance(text, str):
        raise ParseError("timestamp is not a string")
    try:
        # Python 3.11 accepts "Z" and Postmark's seven fractional digits.
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ParseError("timestamp is not ISO 8601") from None
    return _utc(value)


def from_unix(value: object) -> datetime:
    """Parse Unix seconds given as an int, float or digit string (SendGrid, Mailgun)."""
    if isinstance(value, bool):
        raise ParseError("timestamp is not a number")
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ParseError("timestamp is not a number") from None
    elif isinstance(value, int | float):
        number = float(value)
    else:
        raise ParseError("timestamp is not a number")
    if not math.isfinite(number):
        raise ParseError("timestamp is not finite")
    try:
        return datetime.fromtimestamp(number, UTC)
    except (OverflowError, OSError, ValueError):
        raise ParseError("timestamp out of range") from None


def from_rfc5322(text: str) -> datetime:
    """Parse an RFC 5322 date (``Mon, 01 Jan 2024 00:00:10 +0000``) as used in DSN and ARF."""
    try:
        value = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise ParseError("date is not an RFC 5322 date") from None
    return _utc(value)


def _utc(value: datetime) -> datetime:
    # A "-0000" zone (RFC 5322 section 3.3: time in UTC, local zone unknown) and a bare
    # ISO time both come back naive; both mean UTC.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
