"""Header validation, RFC 2047 encoding, address formatting and folding for outgoing mail."""

from __future__ import annotations

import base64
import binascii
import codecs
import email.policy
import re

from mailer.errors import ConfigError, HeaderInjection, InvalidAddress

#: RFC 5322 section 2.1.1: a line MUST NOT exceed 998 characters (CRLF excluded).
MAX_LINE = 998
#: RFC 5322 section 2.1.1: a line SHOULD NOT exceed 78 characters (CRLF excluded).
SOFT_LINE = 78
#: RFC 2047 section 2: an encoded-word is at most 75 characters long.
MAX_ENCODED_WORD = 75

# C0 controls (TAB included: no caller needs one), DEL, and the three code points that
# Python's str.splitlines() and some MUAs treat as line breaks (NEL, LS, PS). Lone
# surrogates are refused as well: they cannot be encoded to UTF-8 later.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")

# Two readings of an RFC 2047 encoded-word, both tried at every "=?": a lenient one (any
# encoded text up to the first "?=", as email.header.decode_header reads it) and a strict
# one (no "?" in the text, as RFC 2047 writes it). Parsers disagree on the edge cases, and
# CVE-2024-6923 lived in exactly that gap, so a value is refused if either reading hides
# a line break.
_EW_LENIENT = re.compile(r"=\?([^?]*)\?([QqBb])\?(.*?)\?=", re.DOTALL)
_EW_STRICT = re.compile(r"=\?([^?]*)\?([QqBb])\?([^?]*)\?=")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")

_ENCODED_WORD_PREFIX = "=?utf-8?b?"
_ENCODED_WORD_OVERHEAD = len(_ENCODED_WORD_PREFIX) + len("?=")

# An addr-spec as email-validator normalises it for the wire: dot-atom local part and an
# ASCII (A-label) domain. No quoted local parts or domain literals (both refused upstream).
_ADDR_SPEC = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
# RFC 5322 phrase of plain atoms separated by single spaces: safe to write unquoted.
_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
# RFC 5322 section 3.6.8: field-name is printable US-ASCII except ":".
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_FOLD_TOKEN = re.compile(r" *[^ ]+| +")
_SENDER = re.compile(r"(?:(?P<name>.*?)\s*<(?P<addr>[^<>]*)>|(?P<bare>[^<>\s]+))", re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _decode_encoded_word(charset: str, cte: str, text: str) -> str | None:
    """Decode one encoded-word; ``None`` when it cannot be decoded (bad charset or data)."""
    # RFC 2231 section 5 lets a language tag follow the charset: "utf-8*en".
    charset = charset.partition("*")[0]
    try:
        raw = text.encode("ascii")
        if cte in "Bb":
            compact = b"".join(raw.split())
            data = binascii.a2b_base64(compact + b"=" * (-len(compact) % 4))
        else:
            # RFC 2047 section 4.2: "_" is a space; "=XX" is an octet.
            data = _Q_ESCAPE.sub(lambda m: bytes.fromhex(m.group(1).decode()),
                                 raw.replace(b"_", b" "))
        codecs.lookup(charset)
        return data.decode(charset)
    except (UnicodeError, LookupError, binascii.Error, ValueError):
        return None


def _encoded_words_safe(value: str) -> bool:
    """True when no reading of any encoded-word in ``value`` hides a forbidden character."""
    start = value.find("=?")
    while start != -1:
        for pattern in (_EW_LENIENT, _EW_STRICT):
            match = pattern.match(value, start)
            if match is None:
                continue
            decoded = _decode_encoded_word(*match.groups())
            if decoded is None or _FORBIDDEN.search(decoded):
                return False
        start = value.find("=?", start + 1)
    # Cross-check with the parser a Python receiver would use; it decodes words that the
    # RFC says are not encoded-words (unknown charsets, whitespace inside the word).
    try:
        parsed = str(email.policy.default.header_factory("subject", value))
    except Exception:  # a value the stdlib cannot even parse is not one we send
        return False
    return _FORBIDDEN.search(parsed) is None


def check_header_value(field: str, value: str) -> str:
    """Return ``value`` unchanged, or raise :class:`HeaderInjection` if it could inject a line."""
    # The messages name the field but never echo the value: it is caller data and may be
    # personal (SPEC section 10 logging rule).
    if _FORBIDDEN.search(value):
        raise HeaderInjection(f"{field}: contains a control or line-break character")
    if len(value) > MAX_LINE or (not value.isascii() and len(value.encode()) > MAX_LINE):
        raise HeaderInjection(f"{field}: longer than {MAX_LINE} octets")
    if "=?" in value and not _encoded_words_safe(value):
        raise HeaderInjection(
            f"{field}: contains an encoded-word that is undecodable or decodes to a control"
            " character"
        )
    return value


def _plain_ascii(value: str, offset: int) -> bool:
    """True when ``value`` can be written as is and still folded to short lines."""
    if not (value.isascii() and value.isprintable()) or "=?" in value:
        return False
    # Leading whitespace is dropped by parsers when they unfold; keep it via encoding.
    if value[:1] == " ":
        return False
    words = value.split(" ")
    # A word that cannot fit on one folded line is split across encoded-words instead.
    return len(words[0]) + offset <= SOFT_LINE and max(map(len, words)) < SOFT_LINE


def _encoded_words(value: str, offset: int) -> list[str]:
    """Split ``value`` into UTF-8 ``B`` encoded-words that never cut a character in two."""
    raw = value.encode()
    words: list[str] = []
    room = max(SOFT_LINE - offset, 24)
    pos = 0
    while pos < len(raw):
        # Base64 turns 3 octets into 4 characters; stay within the line and RFC 2047's 75.
        budget = (min(room, MAX_ENCODED_WORD) - _ENCODED_WORD_OVERHEAD) // 4 * 3
        end = min(pos + budget, len(raw))
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # UTF-8 continuation octet
            end -= 1
        words.append(
            _ENCODED_WORD_PREFIX + base64.b64encode(raw[pos:end]).decode("ascii") + "?="
        )
        pos = end
        room = SOFT_LINE - 1  # continuation lines start with the folding space
    return words


def encode_header_text(value: str, *, offset: int = 0) -> str:
    """Encode unstructured text (RFC 2047 ``B``, UTF-8) unless it is plain printable ASCII.

    ``offset`` is how many characters precede the value on its first line (``len("Subject:
    ")``), so the first encoded-word is sized to keep that line within 78 characters.
    """
    if _plain_ascii(value, offset):
        return value
    # RFC 2047 section 6.2: white space between adjacent encoded-words is not displayed,
    # so folding between them does not change the decoded text.
    return "\r\n ".join(_encoded_words(value, offset))


def format_address(email: str, name: str | None) -> str:
    """Format a mailbox as ``Display Name <local@domain>`` with the phrase quoted or encoded."""
    # The address was validated and normalised to ASCII by the caller; this guard only
    # makes sure nothing structural (CR, LF, "<", ">", ",") can ride along in it.
    if not _ADDR_SPEC.fullmatch(email):
        raise InvalidAddress("address is not a normalised ASCII addr-spec")
    if not name:
        return email
    check_header_value("display name", name)
    offset = len("Reply-To: ")  # the longest header this is written into
    if (name.isascii() and name.isprintable() and "=?" not in name
            and max(map(len, name.split(" "))) + offset < SOFT_LINE):
        if _ATOM_PHRASE.fullmatch(name):
            phrase = name
        else:
            # RFC 5322 section 3.2.4: a quoted-string escapes only "\" and '"'. Quoting
            # also keeps runs of spaces, which parsers collapse in encoded-words.
            phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        # RFC 2047 section 5: encoded-words may not sit inside a quoted-string, so the
        # whole phrase becomes encoded-words (which also protects ",", "<" and quotes).
        phrase = "\r\n ".join(_encoded_words(name, offset))
    return f"{phrase} <{email}>"


def parse_sender(value: str) -> tuple[str | None, str]:
    """Split a configured sender such as ``Mailer <no-reply@example.com>`` into (name, email)."""
    match = _SENDER.fullmatch(value.strip())
    if match is None:
        raise ConfigError("sender must look like 'Name <local@example.com>' or 'local@example.com'")
    address = (match.group("addr") or match.group("bare") or "").strip()
    if not _ADDR_SPEC.fullmatch(address):
        raise ConfigError("sender address must be a plain ASCII addr-spec (punycode domain)")
    name = (match.group("name") or "").strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = _QUOTED_PAIR.sub(r"\1", name[1:-1])
    elif any(char in name for char in '<>"'):
        raise ConfigError("sender display name with <, > or quotes must be a quoted-string")
    try:
        check_header_value("sender display name", name)
    except HeaderInjection as exc:
        raise ConfigError(str(exc)) from None
    return (name or None), address


def fold(name: str, value: str) -> bytes:
    """Return ``Name: value\\r\\n`` as ASCII bytes, folded at spaces to lines of <= 78 chars."""
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError("not a valid header field name")
    if "\r\n" in value:
        # Already folded (encoded-words); unfold and fold again for this field's width.
        value = value.replace("\r\n ", " ")
    if _FORBIDDEN.search(value):
        # Last line of defence: only the folds written here may put CRLF into a header.
        raise HeaderInjection(f"{name}: contains a control or line-break character")
    if not value.isascii():
        raise ValueError("header values must be ASCII here; encode them first")
    head = f"{name}: "
    if len(head) + len(value) <= SOFT_LINE:
        return f"{head}{value}\r\n".encode("ascii")
    lines: list[str] = []
    line = head
    for token in _FOLD_TOKEN.findall(value):
        # Fold only before a space that is followed by text: a whitespace-only line is
        # obsolete syntax (RFC 5322 section 4.2). Unfolding gives back the exact value.
        if len(line) + len(token) > SOFT_LINE and line != head and token.strip():
            lines.append(line)
            line = token
        else:
            line += token
    lines.append(line)
    if max(map(len, lines)) > MAX_LINE:
        raise HeaderInjection(f"{name}: contains a word too long for one line")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")
