"""Parse raw mail with the stdlib and walk it within fixed bounds, never raising.

Everything a reader sees goes through here: the parse (``compat32``, which keeps header
values as plain text and tolerates broken MIME), a bounded walk of the part tree, and the
decoding of text parts with whatever charset they claim, falling back to UTF-8 with
replacement characters. Bounce messages come from every kind of MTA ever written; none
of that may turn into an exception or unbounded work (SPEC section 4).
"""

from __future__ import annotations

import codecs
import email
import email.header
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.message import Message

#: Bytes of a raw message that are parsed; the report part of a bounce comes first, and
#: whatever is cut off is the tail of an attached original.
MAX_INPUT = 4 * 1024 * 1024

#: Parts visited per message and nesting depth followed: real reports have a handful.
MAX_PARTS = 200
MAX_DEPTH = 12

#: Characters of decoded text kept per part.
MAX_PART_TEXT = 256 * 1024

#: Content types of the part that carries (the headers of) the reported original message.
ORIGINAL_TYPES = frozenset(
    {"message/rfc822", "message/global", "text/rfc822-headers", "message/global-headers"}
)

_SURROGATES = re.compile("[\ud800-\udfff]")
_NEWLINES = re.compile(r"\r\n?")


@dataclass(frozen=True)
class Part:
    """One visited MIME part: where it sits and whether it belongs to a reported original."""

    message: Message
    content_type: str
    depth: int
    in_original: bool


def parse(raw: bytes) -> Message | None:
    """Parse raw bytes into a message; None when the stdlib parser gives up."""
    try:
        return email.message_from_bytes(raw[:MAX_INPUT], policy=policy.compat32)
    except (RecursionError, MemoryError):
        # Thousands of nested multiparts exhaust the parser's recursion.
        return None
    except Exception:
        return None


def content_type(message: Message) -> str:
    """Return the lower-cased content type, ``text/plain`` when it cannot be read."""
    try:
        return message.get_content_type()
    except Exception:
        return "text/plain"


def walk(message: Message) -> Iterator[Part]:
    """Yield the parts of ``message`` depth-first, within :data:`MAX_PARTS` and depth.

    Parts below a ``message/rfc822`` (or a sibling type) are flagged ``in_original``:
    they are the reported message, not the report, and readers look there only for
    the original's headers.
    """
    stack: list[tuple[Message, int, bool]] = [(message, 0, False)]
    seen = 0
    while stack and seen < MAX_PARTS:
        current, depth, in_original = stack.pop()
        seen += 1
        ctype = content_type(current)
        yield Part(current, ctype, depth, in_original)
        if depth >= MAX_DEPTH:
            continue
        children = subparts(current)
        # message/delivery-status is pre-parsed into one Message per field block: those
        # blocks are fields, not parts.
        if ctype in ("message/delivery-status", "message/feedback-report"):
            continue
        inner_original = in_original or ctype in ORIGINAL_TYPES
        for child in reversed(children):
            stack.append((child, depth + 1, inner_original))


def subparts(message: Message) -> list[Message]:
    """Return the direct sub-messages of a part (empty for a leaf)."""
    try:
        payload = message.get_payload()
    except Exception:
        return []
    if not isinstance(payload, list):
        return []
    return [p for p in payload[:MAX_PARTS] if isinstance(p, Message)]


def text_of(message: Message) -> str:
    """Return the decoded text of a leaf part, at most :data:`MAX_PART_TEXT` characters."""
    try:
        data = message.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        try:
            payload = message.get_payload()
        except Exception:
            return ""
        if not isinstance(payload, str):
            return ""
        data = payload.encode("utf-8", "surrogateescape")
    data = data[: MAX_PART_TEXT * 4]
    return normalise(decode(data, charset_of(message)))[:MAX_PART_TEXT]


def charset_of(message: Message) -> str | None:
    """Return the part's declared charset, None when absent or unreadable."""
    try:
        charset = message.get_content_charset()
    except Exception:
        return None
    return charset if isinstance(charset, str) else None


def decode(data: bytes, charset: str | None) -> str:
    """Decode bytes with ``charset`` when Python knows it, else UTF-8 with replacements."""
    if charset:
        try:
            codecs.lookup(charset)
            return data.decode(charset, "replace")
        except (LookupError, ValueError, TypeError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Unlabelled 8-bit text from old MTAs is usually Latin-1; keeping its bytes as
        # characters keeps every ASCII address intact either way.
        return data.decode("latin-1")


def normalise(text: str) -> str:
    """Unify line ends to ``\\n`` (old Mac mail uses bare CR) and drop NULs/surrogates."""
    return _SURROGATES.sub("\ufffd", _NEWLINES.sub("\n", text).replace("\x00", ""))


def header(message: Message, name: str) -> str | None:
    """Return the text of header ``name`` (RFC 2047 decoded), None when absent or blank."""
    try:
        value = message.get(name)
    except Exception:
        return None
    if value is None:
        return None
    text = decode_words(value)
    return text.strip() or None


def headers(message: Message, name: str) -> list[str]:
    """Return the texts of every header ``name``, in order."""
    try:
        values = message.get_all(name) or []
    except Exception:
        return []
    found = [decode_words(v).strip() for v in values[:50]]
    return [v for v in found if v]


def decode_words(value: object) -> str:
    """Decode RFC 2047 encoded words; values that cannot be decoded are kept as they are."""
    raw = _SURROGATES.sub("\ufffd", str(value))
    if "=?" not in raw:
        return normalise(raw)
    try:
        pieces = email.header.decode_header(raw)
        out = []
        for chunk, charset in pieces:
            if isinstance(chunk, bytes):
                out.append(decode(chunk, charset))
            else:
                out.append(chunk)
        return normalise("".join(out))
    except Exception:
        return normalise(raw)


_TAGS_DROPPED = re.compile(r"<(script|style|head)\b[^>]{0,500}>.{0,100000}?</\1\s*>", re.I | re.S)
_BREAKS = re.compile(
    r"<\s*(br|/p|p|/div|div|/tr|tr|/li|li|/h\d|hr|/table|pre|/pre)\b[^>]{0,500}>", re.I
)
_TAG = re.compile(r"<[^<>]{0,2000}>")
_MAILTO = re.compile(
    r"""<a\s[^>]{0,500}?href\s*=\s*["']?mailto:([^"'>\s?]{1,320})[^>]{0,500}>(.{0,500}?)</a\s*>""",
    re.I | re.S,
)


def html_to_text(markup: str) -> str:
    """Reduce an HTML part to plain text lines: tags out, entities decoded, links kept."""
    text = _TAGS_DROPPED.sub(" ", markup)
    # Exchange NDRs put the failed address only in a mailto: link around a display name.
    text = _MAILTO.sub(lambda m: f"{_TAG.sub(' ', m.group(2))} <{m.group(1)}>", text)
    text = _BREAKS.sub("\n", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    return "\n".join(" ".join(line.split()) for line in text.split("\n"))
