"""Hand-assembled ``multipart/alternative`` messages, built in tens of microseconds.

``EmailMessage`` costs about 2 ms per message (measured on the 2-vCPU benchmark machine
of the README) and, on Python 3.11.7, lets an RFC 2047-encoded newline through into the
header block (CVE-2024-6923). The bytes are therefore written here, after every
caller-supplied value has passed :func:`mailer.mail.headers.check_header_value`.
"""

from __future__ import annotations

import binascii
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING

from mailer.errors import HeaderInjection
from mailer.mail.headers import (
    MAX_LINE,
    check_header_value,
    encode_header_text,
    fold,
    format_address,
    parse_sender,
)
from mailer.mail.text import html_to_text

if TYPE_CHECKING:
    from mailer.mail.dkim import DkimSigner

_CRLF = b"\r\n"
_EXTRA_NAME = re.compile(r"[A-Za-z0-9-]+")
# RFC 5322 section 3.6.4 msg-id with dot-atom-text on both sides. "=" and "?" are left
# out so that a Message-ID can never be mistaken for an encoded-word.
_MESSAGE_ID = re.compile(r"<[A-Za-z0-9!#$%&'*+/^_`{|}~.-]+@[A-Za-z0-9!#$%&'*+/^_`{|}~.-]+>")
# Fields the builder writes itself. Letting extra headers repeat them would give a
# message two From or Subject fields, which RFC 5322 section 3.6 forbids and which
# receivers resolve differently (a spoofing vector); transport and trace fields are the
# relay's business.
_RESERVED = frozenset({
    "bcc", "cc", "content-language", "content-transfer-encoding", "content-type", "date",
    "dkim-signature",
    "from", "message-id", "mime-version", "received", "reply-to", "return-path", "sender",
    "subject", "to",
})
_TEXT_TYPE = b"Content-Type: text/plain; charset=utf-8\r\n"
_HTML_TYPE = b"Content-Type: text/html; charset=utf-8\r\n"
#: Where text lines are wrapped: RFC 5322 section 2.1.1 asks for lines of at most 78
#: characters, and plain-text readers show longer ones as one run-on line.
TEXT_WIDTH = 78
#: RFC 5322 section 2.1.1's hard limit for a line, without its CRLF.
_MAX_RAW_LINE = 998
# RFC 2046 section 4.1.1: in text/* bodies a line break is CRLF. Every other spelling is
# turned into one, so no bare CR or LF (the stuff of SMTP smuggling) reaches the wire.
_LINE_END = re.compile(r"\r\n|\r|\n")
# What 7bit data may carry (RFC 2045 section 2.7): printable ASCII, TAB, and CR and LF
# (which only ever appear in the CRLF line breaks written here). Deleting these bytes
# leaves nothing of a body that may go as 7bit: one C pass, where a regex search for the
# other controls took six times as long.
_SEVEN_BIT = bytes(range(0x20, 0x7F)) + b"\t\r\n"
_SUBJECT_OFFSET = len("Subject: ")
# RFC 3282 section 2 / RFC 5646: letters and digits in hyphen-separated subtags.
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8}){0,8}")


@dataclass(frozen=True)
class Envelope:
    """What the SMTP transport sends: MAIL FROM, RCPT TO and the DATA bytes."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


def _base64_body(raw: bytes) -> bytes:
    """Base64 with 76-character CRLF lines (RFC 2045 section 6.8).

    Base64 output holds no "." and no bare CR or LF, so SMTP-smuggling sequences such as
    ``\\n.\\n`` in a body cannot reach the wire as such.
    """
    encoded = binascii.b2a_base64(raw, newline=False)
    return _CRLF.join([encoded[i:i + 76] for i in range(0, len(encoded), 76)])


def _lines(text: str) -> list[str]:
    """``text`` split at every line break; str.split when there is no CR (the usual case)."""
    return text.split("\n") if "\r" not in text else _LINE_END.split(text)


def wrap_text(text: str, width: int = TEXT_WIDTH) -> list[str]:
    """Split ``text`` into lines, breaking lines longer than ``width`` at spaces.

    Words are never cut, so a long URL stays whole on a line of its own; short lines,
    such as the ``-- `` that sets off the footer (RFC 3676 section 4.3), are kept exactly.
    """
    out: list[str] = []
    for line in _lines(text):
        if len(line) <= width or " " not in line.strip(" "):
            out.append(line)
        elif line.isprintable() and "  " not in line and line[0] != " " and line[-1] != " ":
            _wrap_plain(line, width, out)
        else:
            _wrap_words(line, width, out)
    return out


def _wrap_words(line: str, width: int, out: list[str]) -> None:
    """Wrap one line word by word: any spacing, indentation kept, runs of spaces folded."""
    indent = line[: len(line) - len(line.lstrip(" "))]
    current = indent
    for word in line[len(indent):].split(" "):
        if not word:
            continue
        if current.strip() and len(current) + 1 + len(word) > width:
            out.append(current)
            current = word
        elif current.strip():
            current += " " + word
        else:
            current += word
    out.append(current)


def _wrap_plain(line: str, width: int, out: list[str]) -> None:
    """:func:`_wrap_words` for a line of words split by single spaces, searched in C.

    With no other white space, no indentation and no double space, each output line is
    the longest run of whole words that fits, found by the last space within ``width``
    (a word longer than that stands alone): what the word loop gives, without the loop.
    """
    start, end = 0, len(line)
    while end - start > width:
        cut = line.rfind(" ", start, start + width + 1)
        if cut <= start:
            cut = line.find(" ", start + width + 1)
            if cut < 0:
                break
        out.append(line[start:cut])
        start = cut + 1
    out.append(line[start:])


#: Lines whose quoted-printable form is remembered, and the longest line remembered.
_QP_LINES = 8192
_QP_LINE_CHARS = 1000
_qp_cache: dict[str, bytes] = {}


def _qp_line(line: str) -> bytes:
    """One line that a line break follows, in quoted-printable, without that break.

    b2a_qp encodes "=", controls, white space at the end of a line and a line that is a
    lone ".", and soft-breaks at 76 characters, all within the line; only whether a line
    break follows changes its output (it soft-breaks a 76-character line before a CR). So
    a text encodes as its lines, each encoded with its CRLF, joined (the tests check it
    on random text). Most lines of a template's text part are the same in every message,
    and encoding each again was half of building a text part: they are remembered, up
    to a bound.
    """
    encoded = _qp_cache.get(line)
    if encoded is None:
        encoded = _qp(line + "\r\n")[:-2]
        if len(line) <= _QP_LINE_CHARS:
            if len(_qp_cache) >= _QP_LINES:
                _qp_cache.clear()
            _qp_cache[line] = encoded
    return encoded


def _qp(text: str) -> bytes:
    """``text`` (CRLF line breaks) in quoted-printable, every line break CRLF."""
    # "replace": a lone surrogate from JSON. b2a_qp's soft line breaks copy the first line
    # break it saw, a bare LF when the text has none: spell them all CRLF.
    encoded = binascii.b2a_qp(text.encode("utf-8", "replace"), istext=True)
    return encoded.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def text_part(content_type: bytes, text: str, *, wrap: bool) -> bytes:
    """One text part, headers and body, in the plainest encoding that carries it.

    Plain-text clients and spam filters read base64 text as a sign of hiding something
    (SpamAssassin's MIME_BASE64_TEXT), so ASCII goes as 7bit and mostly-Latin text as
    quoted-printable (RFC 2045 section 6.7); only text that is mostly outside ASCII, where
    quoted-printable would triple its size, is base64.
    """
    lines = wrap_text(text) if wrap else _lines(text)
    body = "\r\n".join(lines)
    raw = body.encode("utf-8", "replace")  # "replace": a lone surrogate from JSON
    if (
        raw.isascii()
        and not raw.translate(None, _SEVEN_BIT)
        and max(map(len, lines)) <= _MAX_RAW_LINE
        and "." not in lines
    ):
        return content_type + b"Content-Transfer-Encoding: 7bit\r\n\r\n" + raw
    if len(raw) - len(body) <= len(body) // 3:
        encoded = b"\r\n".join([*map(_qp_line, lines[:-1]), _qp(lines[-1])])
        return content_type + b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    return content_type + b"Content-Transfer-Encoding: base64\r\n\r\n" + _base64_body(raw)


class MessageBuilder:
    """Builds a message's bytes; make one per process from the configured sender."""

    def __init__(
        self, mail_from: str, reply_to: str | None, dkim: DkimSigner | None = None
    ) -> None:
        name, self.sender = parse_sender(mail_from)
        self._from = fold("From", format_address(self.sender, name))
        self._reply_to = b""
        if reply_to:
            reply_name, reply_address = parse_sender(reply_to)
            self._reply_to = fold("Reply-To", format_address(reply_address, reply_name))
        self._dkim = dkim
        # The Date field of the moment formatted last: a slice of messages shares one
        # datetime object (immutable, and held here, so its identity is not reused).
        self._last_date: tuple[datetime | None, bytes] = (None, b"")

    def _date_field(self, date: datetime) -> bytes:
        seen, field = self._last_date
        if date is not seen:
            field = b"Date: " + format_datetime(date).encode("ascii") + _CRLF
            self._last_date = (date, field)
        return field

    def build(
        self,
        *,
        to_email: str,
        to_name: str | None,
        subject: str,
        html: str,
        text: str | None,
        message_id: str,
        date: datetime,
        extra_headers: Sequence[tuple[str, str]] = (),
        content_language: str | None = None,
    ) -> Envelope:
        """Return the envelope and CRLF-terminated bytes of one ``multipart/alternative`` mail.

        ``content_language`` is the BCP 47 tag of the version rendered (SPEC 14), sent as
        ``Content-Language`` (RFC 3282).
        """
        check_header_value("subject", subject)
        if to_name is not None:
            check_header_value("to_name", to_name)
        if not _MESSAGE_ID.fullmatch(message_id) or len(message_id) > MAX_LINE - 12:
            raise HeaderInjection("message_id: not a valid <id-left@id-right> Message-ID")
        if date.tzinfo is None:
            # Timestamps read back from SQLite are naive but stored as UTC.
            date = date.replace(tzinfo=UTC)
        lines = [
            self._from,
            fold("To", format_address(to_email, to_name)),
            fold("Subject", encode_header_text(subject, offset=_SUBJECT_OFFSET)),
            self._date_field(date),
            b"Message-ID: " + message_id.encode("ascii") + _CRLF,
            b"MIME-Version: 1.0\r\n",
            self._reply_to,
        ]
        if content_language is not None:
            if not _LANGUAGE_TAG.fullmatch(content_language):
                raise HeaderInjection("content_language: not a language tag")
            lines.append(b"Content-Language: " + content_language.encode("ascii") + _CRLF)
        for name, value in extra_headers:
            if not _EXTRA_NAME.fullmatch(name) or name.lower() in _RESERVED:
                raise HeaderInjection(f"{name[:40]!r}: not an allowed extra header name")
            check_header_value(name, value)
            # RFC 2369 section 2 (List-*): these fields are pure ASCII, never encoded.
            if not value.isascii():
                raise HeaderInjection(f"{name}: must be ASCII")
            lines.append(fold(name, value))
        if text is None:
            text = html_to_text(html)
        # "=_" cannot occur in base64 or quoted-printable data, and a 7bit body line that
        # starts with "--=_" would need these 128 random bits: the boundary never collides
        # with a body line and stays unguessable (RFC 2046 section 5.1.1).
        boundary = ("=_" + secrets.token_hex(16)).encode("ascii")
        delimiter = b"--" + boundary + _CRLF
        lines += [
            b'Content-Type: multipart/alternative;\r\n boundary="' + boundary + b'"\r\n\r\n',
            delimiter, text_part(_TEXT_TYPE, text, wrap=True), _CRLF,
            delimiter, text_part(_HTML_TYPE, html, wrap=False), _CRLF,
            b"--" + boundary + b"--\r\n",
        ]
        data = b"".join(lines)
        if self._dkim is not None:
            # Signed last, over the final bytes: a DKIM signature covers the message as it is
            # transmitted (RFC 6376 section 5), so nothing may change it after signing.
            data = self._dkim.signature_header(data) + data
        return Envelope(sender=self.sender, recipients=(to_email,), data=data)
