"""Feedback-loop reports in the Abuse Reporting Format (RFC 5965) and its look-alikes.

``Feedback-Type`` decides the kind: ``abuse``, ``fraud`` and ``other`` (and, as RFC 5965
section 7.3 asks, any type we do not know) are complaints; ``opt-out`` is the person
asking to be taken off, an unsubscribe. ``virus``, ``not-spam`` and ``auth-failure`` are
no one's complaint about us and change nothing. The recipient is ``Original-Rcpt-To``;
providers often redact it (RFC 6590), and then our own ``Message-ID`` in the attached
original is what ties the report to a person (SPEC section 8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message

from mailer.reports import addresses
from mailer.reports.message import header, subparts, text_of, walk
from mailer.reports.model import MAX_RECIPIENTS, ReportKind

#: ``Feedback-Type`` values (RFC 5965, 6430, 6591, and the opt-out of the ARF drafts).
FEEDBACK_KINDS: dict[str, ReportKind | None] = {
    "abuse": ReportKind.COMPLAINT,
    "fraud": ReportKind.COMPLAINT,
    "other": ReportKind.COMPLAINT,
    "opt-out": ReportKind.UNSUBSCRIBE,
    "optout": ReportKind.UNSUBSCRIBE,
    # Scanners, not people; RFC 6430 "the user says this is NOT spam"; RFC 6591 our own
    # SPF/DKIM/DMARC failed. None of these is the recipient's wish.
    "virus": None,
    "not-spam": None,
    "auth-failure": None,
}

_FEEDBACK_PART = "message/feedback-report"
_TEXT_FEEDBACK = re.compile(r"^feedback-type\s*:\s*\S", re.I | re.M)
# RFC 6590 redaction leaves a placeholder local part: "redacted", x's, stars or a hash.
_REDACTED = re.compile(r"redacted|^[x*#._-]+$|^[0-9a-f]{24,}$", re.I)
#: Header that Microsoft's junk-mail reporting program (JMRP) adds to the returned copy.
JMRP_RECIPIENT = "X-HmXmrOriginalRecipient"


@dataclass
class ArfResult:
    """What a feedback report said; ``kind`` None means "a report, but no complaint"."""

    feedback_type: str
    kind: ReportKind | None
    recipients: list[str] = field(default_factory=list)
    mail_from: str | None = None
    envelope_id: str | None = None


def read(message: Message, original: Message | None) -> ArfResult | None:
    """Read the feedback report in ``message``; None when it is not one.

    ``original`` is the reported message's headers, when attached: the fallback for the
    recipient of a redacted report.
    """
    fields = _feedback_fields(message)
    if fields is None:
        jmrp = header(original, JMRP_RECIPIENT) if original is not None else None
        jmrp = jmrp or header(message, JMRP_RECIPIENT)
        if jmrp is None:
            return None
        fields = [("feedback-type", "abuse"), ("original-rcpt-to", jmrp)]
    values: dict[str, list[str]] = {}
    for name, value in fields:
        values.setdefault(name, []).append(value)
    feedback = (values.get("feedback-type") or ["other"])[0].split()[0:1]
    feedback_type = feedback[0].lower() if feedback else "other"
    kind = FEEDBACK_KINDS.get(feedback_type, ReportKind.COMPLAINT)
    found = []
    for value in values.get("original-rcpt-to", []) + values.get("removal-recipient", []):
        for address in addresses.find(value) or [value]:
            checked = addresses.check(address)
            if checked is not None and not redacted(checked):
                found.append(checked)
    if not found and original is not None:
        found = _from_original(original)
    mail_from = None
    for value in values.get("original-mail-from", []):
        candidates = addresses.find(value)
        if candidates:
            mail_from = candidates[0]
            break
    envelopes = values.get("original-envelope-id") or [""]
    return ArfResult(
        feedback_type=feedback_type,
        kind=kind,
        recipients=addresses.unique(found)[:MAX_RECIPIENTS],
        mail_from=mail_from,
        envelope_id=envelopes[0].strip("<> ")[:200] or None,
    )


def redacted(address: str) -> bool:
    """Tell whether a provider replaced the local part of ``address`` (RFC 6590)."""
    local = address.split("@", 1)[0]
    return _REDACTED.search(local) is not None


def _from_original(original: Message) -> list[str]:
    """The recipient as the returned copy names it: JMRP's header, else a lone To."""
    jmrp = header(original, JMRP_RECIPIENT)
    if jmrp:
        return [a for a in addresses.find(jmrp) if not redacted(a)][:1]
    to = addresses.unique(addresses.find(header(original, "To") or ""))
    # Only a single named recipient is the person: we send one message per recipient,
    # and a list of several cannot say which of them complained.
    if len(to) == 1 and not redacted(to[0]) and not addresses.is_daemon(to[0]):
        return to
    return []


def _feedback_fields(message: Message) -> list[tuple[str, str]] | None:
    """Return the fields of the first feedback-report part (or pasted text), else None."""
    fallback: list[tuple[str, str]] | None = None
    for part in walk(message):
        if part.content_type == _FEEDBACK_PART:
            return _fields(_part_text(part.message))
        if fallback is None and not part.in_original and part.content_type == "text/plain":
            text = text_of(part.message)
            if _TEXT_FEEDBACK.search(text):
                fallback = _fields(text)
    return fallback


def _part_text(part: Message) -> str:
    inner = subparts(part)
    if inner:
        block = inner[0]
        lines = [f"{name}: {value}" for name, value in block.items()]
        body = block.get_payload()
        if isinstance(body, str):
            lines.append(body)
        return "\n".join(lines)
    return text_of(part)


def _fields(text: str) -> list[tuple[str, str]]:
    """Unfold ``Name: value`` lines; everything else is skipped."""
    found: list[tuple[str, str]] = []
    for line in text.split("\n")[:2000]:
        if line[:1] in (" ", "\t") and found:
            name, value = found[-1]
            found[-1] = (name, f"{value} {line.strip()}"[:2000])
            continue
        name, sep, value = line.partition(":")
        if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,60}", name.strip()):
            found.append((name.strip().lower(), value.strip()))
    return found
