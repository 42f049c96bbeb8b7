"""Reading RFC 6522 ``multipart/report`` messages with the stdlib, safely and without crashing."""

from __future__ import annotations

import email
import email.errors
import hashlib
import re
from datetime import datetime
from email import policy
from email.message import Message
from email.parser import HeaderParser
from email.utils import collapse_rfc2231_value

from mailer.webhooks.errors import ParseError
from mailer.webhooks.times import from_rfc5322

#: Content types of the part that carries (the headers of) the reported message.
ORIGINAL_TYPES = frozenset(
    {"message/rfc822", "message/global", "text/rfc822-headers", "message/global-headers"}
)

_SURROGATES = re.compile("[\ud800-\udfff]")
# RFC 6533 section 3: a "utf-8" address may escape characters as \x{HEX}.
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def read_message(body: bytes) -> Message:
    """Parse raw message bytes; compat32 keeps header values as plain text, never raising."""
    try:
        return email.message_from_bytes(body, policy=policy.compat32)
    except (RecursionError, email.errors.MessageError):
        # Thousands of nested multiparts exhaust the parser's recursion.
        raise ParseError("message could not be parsed") from None


def text(value: object) -> str:
    """Return a header value as text; undecodable bytes become U+FFFD."""
    # compat32 hands back an email.header.Header when a value holds raw 8-bit bytes.
    return _SURROGATES.sub("\ufffd", str(value))


def field(message: Message, name: str) -> str | None:
    """Return the stripped text of header ``name``, None when absent or blank."""
    value = message.get(name)
    if value is None:
        return None
    return text(value).strip() or None


def report_type(message: Message) -> str | None:
    """Return the lower-cased ``report-type`` of a ``multipart/report``, else None."""
    if message.get_content_type() != "multipart/report":
        return None
    value = message.get_param("report-type")
    if value is None or value == "":
        return None
    if isinstance(value, tuple):
        value = collapse_rfc2231_value(value)
    return text(value).strip().lower()


def parts(message: Message) -> list[Message]:
    """Return the direct sub-parts of a multipart message (empty for anything else)."""
    payload = message.get_payload()
    if not isinstance(payload, list):
        return []
    return [p for p in payload if isinstance(p, Message)]


def first_part(message: Message, content_types: frozenset[str]) -> Message | None:
    """Return the first direct sub-part whose content type is in ``content_types``."""
    for part in parts(message):
        if part.get_content_type() in content_types:
            return part
    return None


def field_blocks(part: Message) -> list[Message]:
    """Return the header blocks of a ``message/*`` report part (delivery or feedback fields).

    The stdlib pre-parses ``message/delivery-status`` into one Message per block and other
    ``message/*`` types into one Message; a part it left as text (a transfer encoding, or
    ``message/global-delivery-status``) is decoded and split on blank lines here.
    """
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    raw = part.get_payload(decode=True)
    data = raw if isinstance(raw, bytes) else b""
    content = data.decode("utf-8", "replace").replace("\r\n", "\n")
    parser = HeaderParser(policy=policy.compat32)
    return [parser.parsestr(block) for block in re.split(r"\n[ \t]*\n", content) if block.strip()]


def original_headers(report: Message) -> Message | None:
    """Return the headers of the reported original message, if the report attached them."""
    part = first_part(report, ORIGINAL_TYPES)
    if part is None:
        return None
    payload = part.get_payload()
    if isinstance(payload, list):
        inner = [p for p in payload if isinstance(p, Message)]
        return inner[0] if inner else None
    raw = part.get_payload(decode=True)
    data = raw if isinstance(raw, bytes) else b""
    return HeaderParser(policy=policy.compat32).parsestr(
        data.decode("utf-8", "replace"), headersonly=True
    )


def original_message_id(report: Message) -> str | None:
    """Return the Message-ID of the reported original message: ours, when we sent it."""
    headers = original_headers(report)
    return field(headers, "Message-ID") if headers is not None else None


def report_key(report: Message, body: bytes) -> str:
    """Identify a report: its own Message-ID, else a digest of its bytes."""
    return field(report, "Message-ID") or hashlib.sha256(body).hexdigest()


def first_date(*candidates: str | None) -> datetime:
    """Return the first candidate that parses as an RFC 5322 date, in UTC."""
    for candidate in candidates:
        if candidate:
            try:
                return from_rfc5322(candidate)
            except ParseError:
                continue
    raise ParseError("report has no usable date")


def address(value: str | None) -> str | None:
    """Return the address of a typed DSN/ARF address field (``rfc822; a@b``), else None."""
    if not value:
        return None
    kind, sep, rest = value.partition(";")
    if not sep:
        # ARF's Original-Rcpt-To is a bare address, optionally in angle brackets.
        return value.strip().strip("<>").strip() or None
    found = rest.strip().strip("<>").strip()
    if kind.strip().lower() == "utf-8":
        found = _UTF8_ESCAPE.sub(_unescape, found)
    return found or None


def _unescape(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return match.group(0)
    return chr(code)
