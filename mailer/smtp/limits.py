"""Parse the sending-pace settings ``MAILER_SMTP_MAX_RATE`` and ``MAILER_DOMAIN_LIMITS``.

SPEC section 5 ("Sending pace") and section 10. ``MAILER_DOMAIN_LIMITS`` reads
``gmail.com=20/s:5,*=100/s:20``: per recipient domain a rate and, after the colon, the
most SMTP transactions in flight to that domain at once; ``*`` is the default that every
other domain gets for itself (it is not one budget shared by all other domains).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from mailer.errors import ConfigError

#: The key in :data:`DomainLimits` that stands for every domain not named on its own.
DEFAULT_DOMAIN = "*"

#: Seconds per unit of a rate: ``20/s``, ``600/m``, ``3600/h``.
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}

_ENTRY = re.compile(
    r"""^(?P<domain>[^=\s]+)\s*=\s*
        (?P<count>\d+(?:\.\d+)?)\s*/\s*(?P<unit>[smh])
        (?:\s*:\s*(?P<concurrency>\d+))?$""",
    re.VERBOSE,
)
# A domain as it appears after the @ of an ASCII (punycode) address, RFC 5321 4.1.2.
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.?)+$")


class PaceConfigError(ConfigError, ValueError):
    """Raised when ``MAILER_SMTP_MAX_RATE`` or ``MAILER_DOMAIN_LIMITS`` cannot be parsed."""


@dataclass(frozen=True)
class DomainLimit:
    """The pace allowed to one recipient domain: messages per second, transactions at once."""

    rate: float
    #: Most SMTP transactions in flight to the domain; None when only the rate counts.
    concurrency: int | None = None


#: Per-domain limits by lower-case domain, with :data:`DEFAULT_DOMAIN` for the others.
DomainLimits = Mapping[str, DomainLimit]


def normalise_domain(domain: str) -> str:
    """The form domains are compared and stored in: lower case, no trailing dot."""
    return domain.strip().lower().rstrip(".")


def recipient_domain(address: str) -> str:
    """The normalised domain of an ``local@domain`` address (the part after the last @)."""
    _, at, domain = address.rpartition("@")
    if not at or not domain:
        raise ValueError("address has no domain")
    return normalise_domain(domain)


def parse_max_rate(text: str | None) -> float | None:
    """Parse ``MAILER_SMTP_MAX_RATE`` (messages per second, ``/s`` optional); None if unset."""
    if text is None or not text.strip():
        return None  # SPEC section 10: unlimited by default
    value = text.strip()
    if value.endswith("/s"):
        value = value[:-2].strip()
    try:
        rate = float(value)
    except ValueError:
        raise PaceConfigError(
            f"MAILER_SMTP_MAX_RATE must be messages per second like 14 or 14/s, got {text!r}"
        ) from None
    if not math.isfinite(rate) or rate <= 0:
        raise PaceConfigError(f"MAILER_SMTP_MAX_RATE must be above 0, got {text!r}")
    return rate


def parse_domain_limits(text: str | None) -> dict[str, DomainLimit]:
    """Parse ``MAILER_DOMAIN_LIMITS`` such as ``gmail.com=20/s:5,*=100/s:20``; {} if unset."""
    limits: dict[str, DomainLimit] = {}
    if text is None or not text.strip():
        return limits  # SPEC section 10: no per-domain limits by default
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            raise PaceConfigError(f"MAILER_DOMAIN_LIMITS has an empty entry in {text!r}")
        domain, limit = _parse_entry(entry)
        if domain in limits:
            raise PaceConfigError(f"MAILER_DOMAIN_LIMITS names {domain!r} twice")
        limits[domain] = limit
    return limits


def _parse_entry(entry: str) -> tuple[str, DomainLimit]:
    match = _ENTRY.match(entry)
    if match is None:
        raise PaceConfigError(
            f"MAILER_DOMAIN_LIMITS entry {entry!r} is not domain=RATE/s[:CONCURRENCY], "
            "e.g. gmail.com=20/s:5"
        )
    domain = normalise_domain(match["domain"])
    if domain != DEFAULT_DOMAIN and not _DOMAIN.match(domain):
        raise PaceConfigError(
            f"MAILER_DOMAIN_LIMITS entry {entry!r}: {match['domain']!r} is not a domain "
            "(use its ASCII/punycode form, or * for the default)"
        )
    rate = float(match["count"]) / _RATE_UNITS[match["unit"]]
    if rate <= 0:
        raise PaceConfigError(f"MAILER_DOMAIN_LIMITS entry {entry!r}: the rate must be above 0")
    concurrency = int(match["concurrency"]) if match["concurrency"] is not None else None
    if concurrency is not None and concurrency < 1:
        raise PaceConfigError(
            f"MAILER_DOMAIN_LIMITS entry {entry!r}: the concurrency must be at least 1"
        )
    return domain, DomainLimit(rate, concurrency)


def limit_for(limits: DomainLimits, domain: str) -> DomainLimit | None:
    """The limit that applies to ``domain``: its own entry, else ``*``, else None."""
    return limits.get(normalise_domain(domain), limits.get(DEFAULT_DOMAIN))
