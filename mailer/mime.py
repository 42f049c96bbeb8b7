"""Hand-assembled ``multipart/alternative`` messages, built in tens of microseconds.

``EmailMessage`` costs about 2 ms per message on the target machine (reference
performance.md, B5) and, on Python 3.11.7, lets an RFC 2047-encoded newline through into
the header block (CVE-2024-6923). The bytes are therefore written here, after every
caller-supplied value has passed :func:`mailer.headers.check_header_value`.
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
from mailer.headers import (
    MAX_LINE,
    check_header_value,
    encode_header_text,
    fold,
    format_address,
    parse_sender,
)
from mailer.htmltext import html_to_text

if TYPE_CHECKING:
    from mailer.dkim import DkimSigner

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
    "bcc", "cc", "content-transfer-encoding", "content-type", "date", "dkim-signature",
    "from", "message-id", "mime-version", "received", "reply-to", "return-path", "sender",
    "subject", "to",
})
_PART_TEXT = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
_PART_HTML = b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
_SUBJECT_OFFSET = len("Subject: ")


@dataclass(frozen=True)
class Envelope:
    """What the SMTP transport sends: MAIL FROM, RCPT TO and the DATA bytes."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


def _base64_body(text: str) -> bytes:
    """Base64 with 76-character CRLF lines (RFC 2045 section 6.8).

    Base64 output holds no "." and no bare CR or LF, so SMTP-smuggling sequences such as
    ``\\n.\\n`` in a body cannot reach the wire as such.
    """
    # "replace" keeps a lone surrogate from a caller's JSON from failing the send.
    encoded = binascii.b2a_base64(text.encode("utf-8", "replace"), newline=False)
    return _CRLF.join([encoded[i:i + 76] for i in range(0, len(encoded), 76)])


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
    ) -> Envelope:
        """Return the envelope and CRLF-terminated bytes of one ``multipart/alternative`` mail."""
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
            b"Date: " + format_datetime(date).encode("ascii") + _CRLF,
            b"Message-ID: " + message_id.encode("ascii") + _CRLF,
            b"MIME-Version: 1.0\r\n",
            self._reply_to,
        ]
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
        # "=_" cannot occur in base64 data, so the boundary can never collide with a body
        # line; the random part keeps it unguessable (RFC 2046 section 5.1.1).
        boundary = ("=_" + secrets.token_hex(16)).encode("ascii")
        delimiter = b"--" + boundary + _CRLF
        lines += [
            b'Content-Type: multipart/alternative;\r\n boundary="' + boundary + b'"\r\n\r\n',
            delimiter, _PART_TEXT, _base64_body(text), _CRLF,
            delimiter, _PART_HTML, _base64_body(html), _CRLF,
            b"--" + boundary + b"--\r\n",
        ]
        data = b"".join(lines)
        if self._dkim is not None:
            # Signed last, over the final bytes (standards.md section 7, order of operations).
            data = self._dkim.signature_header(data) + data
        return Envelope(sender=self.sender, recipients=(to_email,), data=data)
