"""A short, address-free excerpt of a report the reader could not read (SPEC 4).

An operator needs to see what kind of mail falls through (which MTA, which subject, which
MIME layout) to teach the reader a new format; nobody needs the addresses or the body for
that. The excerpt keeps the MIME structure and some top-level header fields, each
truncated, with the local part of every address replaced by ``*``: the domain says which
MTA wrote it, the mailbox would say who bounced (personal data we have no reason to keep).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailer.reports.message import content_type, decode_words, parse, walk

#: Header fields kept, in this order: enough to recognise the sending MTA and its format.
KEPT_FIELDS = (
    "From", "Subject", "Content-Type", "Auto-Submitted", "X-Failed-Recipients",
    "X-Mailer", "Precedence", "X-Autoreply", "Return-Path", "Received",
)
#: Characters kept per header field and in the whole excerpt.
MAX_FIELD = 200
MAX_HEADERS = 2000
#: Characters of the MIME structure kept (``multipart/report[text/plain,...]``).
MAX_STRUCTURE = 500
#: Bytes of a message parsed for the excerpt: the top-level headers come first.
MAX_INPUT = 256 * 1024

_ADDRESS = re.compile(r"[^\s<>()\[\]\"',;:@]{1,64}@(?=[A-Za-z0-9.-]+)")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Excerpt:
    """The structure and headers of one unrecognised report."""

    structure: str
    headers: str
    size: int


def mask(text: str) -> str:
    """Replace the local part of every address in ``text`` with ``*``."""
    return _ADDRESS.sub("*@", text)


def excerpt(raw: bytes) -> Excerpt:
    """Build the excerpt of ``raw``; never raises."""
    try:
        message = parse(raw[:MAX_INPUT])
        if message is None:
            return Excerpt("unparseable", "", len(raw))
        # Depth-first, each part prefixed by one ">" per level of nesting.
        structure = " ".join(f"{'>' * part.depth}{part.content_type}" for part in walk(message))
        lines: list[str] = []
        for name in KEPT_FIELDS:
            for value in (message.get_all(name) or [])[:2]:
                text = " ".join(_CONTROL.sub(" ", decode_words(value)).split())
                lines.append(f"{name}: {mask(text)[:MAX_FIELD]}")
        return Excerpt(structure[:MAX_STRUCTURE] or content_type(message),
                       "\n".join(lines)[:MAX_HEADERS], len(raw))
    except Exception:  # hostile input must never stop the report being accepted
        return Excerpt("error", "", len(raw))
