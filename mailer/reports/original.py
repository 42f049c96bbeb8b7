"""The message a report is about: its headers, its Message-ID, and where its bounces go.

SPEC section 4 acts on a report only for mail we sent, matched by our ``Message-ID`` or
the VERP address the report was sent to; this module digs both out of whatever the
report carries: an attached ``message/rfc822`` or ``text/rfc822-headers`` part, header
fields quoted in a plain-text bounce, or the report's own ``In-Reply-To``.
"""

from __future__ import annotations

import re
from email import policy
from email.message import Message
from email.parser import HeaderParser

from mailer.reports import addresses
from mailer.reports.message import ORIGINAL_TYPES, header, headers, subparts, text_of, walk

_QUOTED_ID = re.compile(
    r"^[ \t>]*Message-I[Dd][ \t]*:[ \t]*(?:\n[ \t]+)?(<[^<>\s]{1,250}>|[^<>\s]{1,250})", re.I | re.M
)
_ID = re.compile(r"<([^<>\s]{1,250})>")

#: Headers of a report, best first, that name the address the report was delivered to.
DELIVERY_HEADERS = ("X-Original-To", "Delivered-To", "Envelope-To", "X-Envelope-To", "To")


def attached(message: Message) -> Message | None:
    """Return the headers of the original attached to a report, None when there is none."""
    for part in walk(message):
        if part.in_original or part.content_type not in ORIGINAL_TYPES:
            continue
        inner = subparts(part.message)
        if inner:
            return inner[0]
        text = text_of(part.message)
        if text.strip():
            try:
                return HeaderParser(policy=policy.compat32).parsestr(text, headersonly=True)
            except Exception:
                return None
    return None


def quoted(text: str) -> Message | None:
    """Parse header fields quoted in prose after a bounce's divider line."""
    start = text.find("\n") + 1 if text and not re.match(r"[A-Za-z-]+:", text) else 0
    body = text[start : start + 64 * 1024].lstrip("\n")
    if not re.match(r"[A-Za-z][A-Za-z0-9-]*:", body):
        return None
    try:
        return HeaderParser(policy=policy.compat32).parsestr(body, headersonly=True)
    except Exception:
        return None


def message_id(original: Message | None, quoted_text: str, report: Message) -> str | None:
    """Return the original's Message-ID (no angle brackets): attached, quoted, or replied to."""
    if original is not None:
        found = clean_id(header(original, "Message-ID"))
        if found:
            return found
    match = _QUOTED_ID.search(quoted_text[: 64 * 1024])
    if match is not None:
        found = clean_id(match.group(1))
        if found:
            return found
    # Gmail, Exchange and Office 365 answer the original: In-Reply-To names it.
    return clean_id(header(report, "In-Reply-To"))


def clean_id(value: str | None) -> str | None:
    """Return the bare id of a Message-ID field, None when it holds none."""
    if not value:
        return None
    match = _ID.search(value)
    text = match.group(1) if match else value.strip().split()[0] if value.split() else ""
    text = text.strip("<>").strip()
    return text[:250] or None


def bounce_address(report: Message, original: Message | None) -> str | None:
    """Return the address the report went to: the original's envelope sender (our VERP)."""
    for name in DELIVERY_HEADERS:
        for value in headers(report, name):
            for address in addresses.find(value):
                if not addresses.is_daemon(address):
                    return address
    if original is not None:
        for address in addresses.find(header(original, "Return-Path") or ""):
            return address
    return None


def sender_addresses(report: Message, original: Message | None) -> set[str]:
    """Addresses that are never the failed recipient: both ends of the report, our sender."""
    found: set[str] = set()
    # The report's To is where it was sent: our return path. X-Original-To and
    # Delivered-To should say the same, but gateways have been seen to copy the failed
    # recipient into them, so they are not taken as proof.
    names = ("From", "Sender", "Reply-To", "Return-Path", "Errors-To", "To")
    for name in names:
        for value in headers(report, name):
            found.update(addresses.key(a) for a in addresses.find(value))
    if original is not None:
        addressed: set[str] = set()
        for name in ("To", "Cc"):
            for value in headers(original, name):
                addressed.update(addresses.key(a) for a in addresses.find(value))
        for name in ("From", "Sender", "Reply-To", "Return-Path", "Errors-To"):
            for value in headers(original, name):
                # Someone who mailed themselves is both sender and failed recipient.
                found.update(addresses.key(a) for a in addresses.find(value))
        found -= addressed
    return found


def lone_recipient(original: Message | None) -> str | None:
    """The single To of the returned original, when it can only be the failed recipient.

    A bounce that names nobody in its prose still returns the message it could not
    deliver. Sent one recipient at a time (as we send), that message's lone To is the
    address that failed. A discussion-list message is addressed to the list, not to the
    member whose mailbox bounced (RFC 2369 ``List-Post``, Mailman's ``X-BeenThere``,
    ``Precedence: list``), so it names no one.
    """
    if original is None:
        return None
    if header(original, "List-Post") or header(original, "X-BeenThere"):
        return None
    if (header(original, "Precedence") or "").lower().startswith("list"):
        return None
    found = addresses.unique(
        [a for name in ("To", "Cc") for v in headers(original, name) for a in addresses.find(v)]
    )
    if len(found) != 1 or addresses.is_daemon(found[0]):
        return None
    return found[0]
