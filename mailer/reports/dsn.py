"""RFC 3464 delivery status notifications, wherever they sit in the MIME tree.

Real DSNs break the RFC in every way an MTA can: no ``report-type``, the status part
nested in a ``multipart/mixed`` or forwarded inside a ``message/rfc822``, fields with no
blank line between recipients, home-made ``Action`` values, typeless addresses. This
reader takes the fields as they come:

- the recipient is the rfc822 ``Original-Recipient`` (the address we mailed) when
  present, else the rfc822 ``Final-Recipient`` (SPEC section 4); other address types
  (``x400``, ``unknown``...) are skipped, while RFC 6533 ``utf-8`` addresses and
  typeless ones that are well formed are read as rfc822;
- ``Action`` decides when it is one of RFC 3464's five; an unknown or missing one is
  read by its status: 5.x.x is a failure, 4.x.x a soft failure, anything else nothing.
"""

from __future__ import annotations

import binascii
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

from mailer.reports import addresses
from mailer.reports.message import charset_of, decode, text_of, walk
from mailer.reports.model import MAX_RECIPIENTS, Recipient
from mailer.reports.status import basic_class, classify, enhanced

#: Content types that carry delivery-status fields (RFC 3464, RFC 6533, and one in use).
STATUS_TYPES = frozenset(
    {"message/delivery-status", "message/global-delivery-status", "text/delivery-status"}
)

#: Address types read as an email address (RFC 3464 2.3.2, RFC 6533 3); None is "no type".
MAIL_TYPES = frozenset({"rfc822", "utf-8", None})

#: RFC 3464 section 2.3.3 actions that say the message got through: nothing to report.
SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})

#: Lines of delivery-status fields read per part.
MAX_FIELD_LINES = 20000

_FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,60}")
_RECIPIENT_FIELDS = ("original-recipient", "final-recipient")
_PER_MESSAGE_FIELDS = frozenset(
    {"reporting-mta", "original-envelope-id", "arrival-date", "received-from-mta", "dsn-gateway"}
)
# A diagnostic starts with its type ("smtp; 550 ..."): the type is no news to a reader.
_DIAGNOSTIC_TYPE = re.compile(r"^\s*[A-Za-z][\w.-]{0,20}\s*;\s*")
_TEXT_DSN = re.compile(r"^(?:final|original)-recipient\s*:", re.I | re.M)
_TEXT_DSN_ACTION = re.compile(r"^(?:action|status)\s*:", re.I | re.M)


@dataclass
class DsnResult:
    """What the delivery-status parts of one message said."""

    #: True when a real delivery-status part had at least one per-recipient block:
    #: the report then speaks for itself, and prose around it is not read for more.
    authoritative: bool = False
    recipients: list[Recipient] = field(default_factory=list)
    envelope_id: str | None = None


def read(message: Message) -> DsnResult:
    """Read every delivery-status part of ``message`` (and DSN fields pasted as text)."""
    result = DsnResult()
    seen: set[str] = set()
    for part in walk(message):
        is_status = part.content_type in STATUS_TYPES
        if not is_status and not _looks_like_text_dsn(part.message, part.content_type):
            continue
        per_message, records = parse_fields(_fields_text(part.message))
        if result.envelope_id is None:
            result.envelope_id = _envelope_id(per_message.get("original-envelope-id"))
        if is_status and records:
            result.authoritative = True
        for record in records:
            recipient = recipient_of(record)
            if recipient is None or addresses.key(recipient.address) in seen:
                continue
            seen.add(addresses.key(recipient.address))
            result.recipients.append(recipient)
            if len(result.recipients) >= MAX_RECIPIENTS:
                return result
    return result


def parse_fields(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Split delivery-status text into per-message fields and per-recipient records.

    Blank lines separate blocks, folded lines are unfolded, and a second recipient field
    inside one block starts a new record (some MTAs leave out the blank line). Lines that
    are not fields are skipped. Names are lower-cased; the first value of a name wins.
    """
    per_message: dict[str, str] = {}
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None

    def flush() -> None:
        nonlocal current, last
        if any(name in current for name in _RECIPIENT_FIELDS):
            # Per-message fields run into the first recipient when the blank line between
            # them is missing.
            for name in _PER_MESSAGE_FIELDS & current.keys():
                per_message.setdefault(name, current[name])
            if len(records) < MAX_RECIPIENTS:
                records.append(current)
        else:
            for name, value in current.items():
                per_message.setdefault(name, value)
        current = {}
        last = None

    for line in _lines(text):
        if not line.strip():
            flush()
            continue
        if line[0] in " \t":
            if last is not None and len(current[last]) < 2000:
                current[last] = f"{current[last]} {line.strip()}"
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not _FIELD_NAME.fullmatch(name):
            last = None
            continue
        lowered = name.lower()
        if lowered in _RECIPIENT_FIELDS and ("final-recipient" in current or lowered in current):
            flush()
        if lowered not in current:
            current[lowered] = value.strip()
            last = lowered
        else:
            last = None
    flush()
    return per_message, records


def recipient_of(record: dict[str, str]) -> Recipient | None:
    """Turn one per-recipient record into a failed or delayed recipient, else None."""
    address = _address(record)
    if address is None:
        return None
    action = _action(record.get("action"))
    if action in SUCCESS_ACTIONS:
        return None
    status = record.get("status")
    diagnostic = record.get("diagnostic-code")
    if diagnostic:
        diagnostic = _DIAGNOSTIC_TYPE.sub("", diagnostic, count=1)
    # The Status comment ("5.1.1 (user unknown)") is prose about this recipient too.
    text = " ".join(v for v in (diagnostic, status) if v)
    verdict = classify(status, text)
    code = verdict.status or enhanced(status)
    if action == "delayed":
        return Recipient(
            address, delayed=True, policy=verdict.policy, status=code, diagnostic=diagnostic
        )
    if action != "failed":
        # Unknown or missing Action: the status says what happened.
        klass = code[0] if code else basic_class(status) or basic_class(diagnostic)
        if klass not in ("4", "5"):
            return None
    if not verdict.failed:
        # "failed" with a 2.x.x status contradicts itself: count it, never suppress.
        return Recipient(address, status=code, diagnostic=diagnostic)
    return Recipient(
        address, hard=verdict.hard, policy=verdict.policy, status=code, diagnostic=diagnostic
    )


def _address(record: dict[str, str]) -> str | None:
    # SPEC section 4: the rfc822 Original-Recipient is the address we mailed; the Final-
    # Recipient may be what an alias or forwarding turned it into.
    for name in _RECIPIENT_FIELDS:
        kind, address = addresses.typed(record.get(name))
        if address is None or kind not in MAIL_TYPES:
            continue
        if kind is None and addresses.check(address) is None:
            continue
        return address
    return None


def _action(value: str | None) -> str:
    # Action may carry a comment ("failed (mailbox gone)"): the first word decides.
    words = (value or "").split()
    return words[0].split("(", 1)[0].lower() if words else ""


def _envelope_id(value: str | None) -> str | None:
    if not value:
        return None
    return value.strip().strip("<>").strip()[:200] or None


def _fields_text(part: Message) -> str:
    """Return a delivery-status part as text, whether the stdlib pre-parsed it or not."""
    try:
        payload = part.get_payload()
    except Exception:
        return ""
    if isinstance(payload, list):
        if _encoding(part) in ("base64", "quoted-printable"):
            # The stdlib split the still-encoded text into "blocks": join and decode it.
            return _decode_blocks(payload, _encoding(part))
        blocks = []
        for block in payload[: MAX_RECIPIENTS + 1]:
            if not isinstance(block, Message):
                continue
            lines = [f"{name}: {value}" for name, value in block.items()]
            body = block.get_payload()
            if isinstance(body, str) and body.strip():
                lines.append(body)
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)
    return text_of(part)


def _encoding(part: Message) -> str:
    try:
        return str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    except Exception:
        return ""


def _decode_blocks(blocks: list[Any], encoding: str) -> str:
    chunks = []
    for block in blocks[: MAX_RECIPIENTS + 1]:
        if isinstance(block, Message):
            try:
                text = block.as_string()
            except Exception:
                text = ""
            chunks.append(text)
    encoded = "\n".join(chunks).encode("ascii", "replace")
    try:
        if encoding == "base64":
            data = binascii.a2b_base64(b"".join(encoded.split()))
        else:
            data = quopri.decodestring(encoded)
    except (binascii.Error, ValueError):
        return ""
    return decode(
        data[: 1024 * 1024],
        charset_of(blocks[0]) if blocks and isinstance(blocks[0], Message) else None,
    )


def _looks_like_text_dsn(part: Message, ctype: str) -> bool:
    """Tell whether a leaf text part holds DSN fields pasted as prose."""
    if ctype not in ("text/plain", "application/octet-stream", "message/rfc822-headers"):
        return False
    try:
        if part.is_multipart():
            return False
    except Exception:
        return False
    text = text_of(part)
    return bool(_TEXT_DSN.search(text) and _TEXT_DSN_ACTION.search(text))


def _lines(text: str) -> Iterator[str]:
    for count, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n")):
        if count >= MAX_FIELD_LINES:
            return
        yield line[:2000]
