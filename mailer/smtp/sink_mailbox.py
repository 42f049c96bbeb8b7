"""The capturing sink's directory as the view reads it (SPEC 11): list, summarise, parse.

Read-only. A name is only ever looked up among the names listed from the directory, never
joined to a path, so no request can read a file outside it (see :mod:`mailer.smtp.sink_view`).
"""

from __future__ import annotations

import email.policy
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from stat import S_ISREG

#: The list shows at most this many of the newest messages.
MAX_LISTED = 500
#: The list reads at most this much of each file to find its headers.
HEADER_READ_LIMIT = 64 * 1024

#: File names the view serves: what the sink writes (``<stamp>-<counter>.eml``) and other
#: plain names; a dot-prefixed temporary file of the sink never matches.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.eml")


@dataclass(frozen=True)
class Summary:
    """One line of the list: a captured message's file name and its main headers."""

    name: str
    date: str
    sender: str
    to: str
    subject: str


@dataclass(frozen=True)
class Captured:
    """One captured message, parsed for display."""

    summary: Summary
    headers: list[tuple[str, str]]
    text: str | None
    html: str | None
    raw: bytes


def _header_value(name: str, raw: str) -> str:
    """A header value decoded (RFC 2047) and unfolded; the raw text when it does not parse."""
    try:
        # As EmailMessage's own header access does: unfold, undo 8-bit surrogates, decode.
        return str(email.policy.default.header_fetch_parse(name, raw))
    except Exception:  # any malformed header is shown as it came
        return " ".join(raw.split())


def _headers(message: Message) -> list[tuple[str, str]]:
    return [(name, _header_value(name, str(value))) for name, value in message.raw_items()]


def _date(headers: Iterable[tuple[str, str]], fallback: datetime) -> str:
    """The Date header as ``YYYY-MM-DD HH:MM:SS +zzzz``; else when the file was written."""
    raw = next((value for name, value in headers if name.lower() == "date"), None)
    when = fallback
    if raw is not None:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return raw
    return when.strftime("%Y-%m-%d %H:%M:%S %z").rstrip()


def _first(headers: Iterable[tuple[str, str]], wanted: str) -> str:
    return next((value for name, value in headers if name.lower() == wanted), "")


def summarise(name: str, head: bytes, written: datetime) -> Summary:
    """The list line of the message whose first bytes (its headers) are ``head``."""
    headers = _headers(BytesHeaderParser().parsebytes(head))
    return Summary(name=name, date=_date(headers, written), sender=_first(headers, "from"),
                   to=_first(headers, "to"), subject=_first(headers, "subject"))


def _part_text(message: EmailMessage, subtype: str) -> str | None:
    """The decoded body part ``text/<subtype>`` that a mail client would show, if any."""
    part = message.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError, AssertionError):
        # An unknown charset or a broken transfer encoding: show what can be read.
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None
    # Mail travels with CRLF line ends (RFC 5322); a page shows lines.
    return content.replace("\r\n", "\n") if isinstance(content, str) else None


def parse(name: str, raw: bytes, written: datetime) -> Captured:
    """Parse a stored message for the message page; never raises on malformed mail."""
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    headers = _headers(message)
    summary = Summary(name=name, date=_date(headers, written), sender=_first(headers, "from"),
                      to=_first(headers, "to"), subject=_first(headers, "subject"))
    return Captured(summary=summary, headers=headers, text=_part_text(message, "plain"),
                    html=_part_text(message, "html"), raw=raw)


class Mailbox:
    """The sink's directory, read-only: list, summarise and read the ``.eml`` files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _listed(self) -> list[tuple[int, str]]:
        """(mtime_ns, name) of every servable file."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []  # no mail captured yet
        listed = []
        for entry in entries:
            if not _NAME.fullmatch(entry.name):
                continue
            try:
                stat = entry.stat()
            except OSError:
                continue  # deleted meanwhile
            if not S_ISREG(stat.st_mode):
                continue
            listed.append((stat.st_mtime_ns, entry.name))
        return listed

    def names(self) -> list[str]:
        """The servable file names, newest first (the name breaks a tie: the sink's names
        start with their arrival time and a counter)."""
        return [name for _, name in sorted(self._listed(), reverse=True)]

    def summaries(self, limit: int = MAX_LISTED) -> tuple[list[Summary], int]:
        """The newest ``limit`` messages' list lines, and how many messages there are."""
        listed = sorted(self._listed(), reverse=True)
        found = []
        for mtime_ns, name in listed[:limit]:
            try:
                with (self.directory / name).open("rb") as handle:
                    head = handle.read(HEADER_READ_LIMIT)
            except OSError:
                continue
            end = head.find(b"\r\n\r\n")
            end = head.find(b"\n\n") if end < 0 else end
            found.append(summarise(name, head if end < 0 else head[:end + 2],
                                   datetime.fromtimestamp(mtime_ns / 1e9, UTC)))
        return found, len(listed)

    def get(self, name: str) -> Captured | None:
        """The message stored under ``name``, if ``name`` is one of the listed files."""
        listed = {n: t for t, n in self._listed()}
        if name not in listed:
            return None
        try:
            raw = (self.directory / name).read_bytes()
        except OSError:
            return None
        return parse(name, raw, datetime.fromtimestamp(listed[name] / 1e9, UTC))
