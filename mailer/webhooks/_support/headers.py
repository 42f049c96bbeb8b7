"""Case-insensitive lookup of HTTP request headers in any mapping."""

from __future__ import annotations

from collections.abc import Mapping


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Return the value of header ``name`` whatever the case of the mapping's keys, else None.

    Parsers accept any ``Mapping[str, str]``: a plain dict as built by a test, a lower-cased
    dict, or a framework's own case-insensitive headers object. HTTP field names are
    case-insensitive (RFC 9110 section 5.1), so an exact match is tried first and then a
    case-folded scan.
    """
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None
