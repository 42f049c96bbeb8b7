"""Read any raw message that reached a bounce or feedback address into one :class:`Report`.

The readers run from the most to the least authoritative, and the first that names
someone decides (SPEC section 4, "Reading real bounces"):

1. an ARF feedback report (RFC 5965): a complaint or an opt-out;
2. RFC 3464 delivery-status fields anywhere in the MIME tree; when a real
   delivery-status part has per-recipient blocks it speaks alone (plus Exim's
   ``X-Failed-Recipients``), and the prose around it is not mined for more addresses;
3. ``X-Failed-Recipients`` (Exim, Gmail), classified from the prose about each address;
4. the prose of the report (:mod:`mailer.reports.plaintext`), unless the message is an
   auto-reply that does not look like a bounce;
5. flufl.bounce's detectors, when installed, for the long tail.

Whatever the bytes, the answer is a report; anything unreadable is ``unrecognised``.
"""

from __future__ import annotations

from email.message import Message

from mailer.reports import addresses, arf, autoreply, dsn, fallback, original, plaintext
from mailer.reports.message import header, headers, parse
from mailer.reports.model import MAX_RECIPIENTS, Recipient, Report, ReportKind, unrecognised
from mailer.reports.prose import DELAY_WORDS, FAILURE_WORDS, FINAL_WORDS, report_text
from mailer.reports.status import classify

#: Bytes of a message handed to the flufl.bounce fallback (its detectors scan everything).
MAX_FALLBACK_INPUT = 256 * 1024


def read_report(raw: bytes) -> Report:
    """Read raw message bytes into a :class:`Report`; never raises."""
    try:
        return _read(raw)
    except Exception:
        # A report reader sits behind an SMTP listener and a webhook: hostile or broken
        # input must end as "unrecognised" (accepted, changes nothing), not as an error
        # the sending MTA would retry forever (SPEC section 4).
        return unrecognised(source="error")


def _read(raw: bytes) -> Report:
    message = parse(raw)
    if message is None:
        return unrecognised(source="unparseable")
    attached = original.attached(message)
    section, quoted_text = report_text(message)
    quoted_headers = original.quoted(quoted_text) if attached is None else None
    source_headers = attached or quoted_headers
    message_id = original.message_id(attached, quoted_text, message)
    bounce_address = original.bounce_address(message, source_headers)
    subject = header(message, "Subject") or ""

    feedback = arf.read(message, source_headers)
    if feedback is not None:
        return _feedback_report(feedback, message_id, bounce_address)

    excluded = original.sender_addresses(message, source_headers)
    status = dsn.read(message)
    failed_header = _x_failed_recipients(message, excluded)
    recipients = list(status.recipients)
    if status.authoritative or recipients:
        known = {addresses.key(r.address) for r in recipients}
        for address in failed_header:
            if addresses.key(address) not in known:
                recipients.append(_from_prose(address, section, single=False))
        return _bounce(recipients, message_id, bounce_address, status.envelope_id, "rfc3464")

    if failed_header:
        single = len(failed_header) == 1
        found = [_from_prose(a, section, single=single) for a in failed_header]
        return _bounce(found, message_id, bounce_address, None, "x-failed-recipients")

    shaped = autoreply.looks_like_bounce(message, subject)
    away = autoreply.is_auto_reply(message, subject, section)
    if away and not shaped:
        return Report(
            ReportKind.AUTO_REPLY,
            message_id=message_id,
            bounce_address=bounce_address,
            source="auto-reply",
        )

    prose = plaintext.read(section, excluded, strict=not shaped, subject=subject)
    if prose.findings:
        single = len(prose.findings) == 1
        found = [
            _classified(f.address, f.block, section if single else "", delayed=prose.delayed)
            for f in prose.findings
        ]
        return _bounce(found, message_id, bounce_address, None, "text")

    aol = _aol_screen_names(message, section, excluded)
    if aol:
        found = [_classified(a, "", section, delayed=prose.delayed) for a in aol]
        return _bounce(found, message_id, bounce_address, None, "text")
    if not away:
        # flufl.bounce's detectors scan whole bodies: give them a bounded prefix only.
        small = message if len(raw) <= MAX_FALLBACK_INPUT else parse(raw[:MAX_FALLBACK_INPUT])
        flufl = _from_fallback(small, section, excluded) if small is not None else []
        if flufl:
            return _bounce(flufl, message_id, bounce_address, None, "flufl.bounce")
    lone = original.lone_recipient(source_headers) if shaped and not away else None
    if (
        lone is not None
        and addresses.key(lone) not in excluded
        and _reads_as_failure(section, subject)
    ):
        found = [_classified(lone, "", section, delayed=prose.delayed)]
        return _bounce(found, message_id, bounce_address, None, "returned-original")
    if away:
        return Report(
            ReportKind.AUTO_REPLY,
            message_id=message_id,
            bounce_address=bounce_address,
            source="auto-reply",
        )
    return unrecognised(source="text" if shaped else "", message_id=message_id)


def _reads_as_failure(section: str, subject: str) -> bool:
    """Tell whether a report's prose or subject speaks of a failure, not a receipt."""
    return bool(FAILURE_WORDS.search(section) or FAILURE_WORDS.search(subject))


def _feedback_report(
    feedback: arf.ArfResult, message_id: str | None, bounce_address: str | None
) -> Report:
    if feedback.kind is None:
        return Report(
            ReportKind.UNRECOGNISED,
            message_id=message_id,
            feedback_type=feedback.feedback_type,
            source="arf",
        )
    return Report(
        feedback.kind,
        recipients=tuple(Recipient(a) for a in feedback.recipients),
        message_id=message_id,
        bounce_address=feedback.mail_from or bounce_address,
        envelope_id=feedback.envelope_id,
        feedback_type=feedback.feedback_type,
        source="arf",
    )


def _bounce(
    recipients: list[Recipient],
    message_id: str | None,
    bounce_address: str | None,
    envelope_id: str | None,
    source: str,
) -> Report:
    kept = _unique(recipients)[:MAX_RECIPIENTS]
    return Report(
        ReportKind.BOUNCE if kept else ReportKind.UNRECOGNISED,
        recipients=tuple(kept),
        message_id=message_id,
        bounce_address=bounce_address,
        envelope_id=envelope_id,
        source=source,
    )


def _x_failed_recipients(message: Message, excluded: set[str]) -> list[str]:
    """Addresses Exim and Gmail list in ``X-Failed-Recipients`` (comma separated)."""
    found: list[str] = []
    for value in headers(message, "X-Failed-Recipients"):
        for address in addresses.find(value):
            # Exim lists exactly the failed addresses: even postmaster@ is one here.
            daemon = addresses.is_daemon(address) and not address.lower().startswith("postmaster@")
            if not daemon and addresses.key(address) not in excluded:
                found.append(address)
    return addresses.unique(found)[:MAX_RECIPIENTS]


def _from_prose(address: str, section: str, *, single: bool) -> Recipient:
    """Classify ``address`` from the prose about it (all of it for a lone recipient)."""
    block = plaintext.block_for(section, address)
    delayed = bool(DELAY_WORDS.search(section)) and not FINAL_WORDS.search(section)
    return _classified(address, block, section if single else "", delayed=delayed)


def _classified(address: str, block: str, context: str, *, delayed: bool) -> Recipient:
    """Build a recipient from its own prose, falling back to the whole section's."""
    verdict = classify(None, block)
    if context and verdict.status is None and not verdict.hard and not verdict.policy:
        # The recipient's lines said nothing definite (Gmail puts the SMTP reply two
        # paragraphs below the address): read the section around it.
        wider = classify(None, context)
        if wider.status is not None or wider.hard or wider.policy:
            verdict = wider
            block = f"{block}\n{context}" if block else context
    if delayed and not verdict.hard:
        return Recipient(
            address, delayed=True, policy=verdict.policy, status=verdict.status, diagnostic=block
        )
    return Recipient(
        address, hard=verdict.hard, policy=verdict.policy, status=verdict.status, diagnostic=block
    )


def _aol_screen_names(message: Message, section: str, excluded: set[str]) -> list[str]:
    """AOL's own bounces name the failed screen names without the domain."""
    sender = " ".join(headers(message, "From"))
    if not any(a.lower().endswith("@aol.com") for a in addresses.find(sender)):
        return []
    return [a for a in plaintext.bare_names(section, "aol.com") if addresses.key(a) not in excluded]


def _from_fallback(message: Message, section: str, excluded: set[str]) -> list[Recipient]:
    temporary, permanent = fallback.failures(message)
    found: list[Recipient] = []
    for group, delayed in ((permanent, False), (temporary, True)):
        for raw in group:
            address = addresses.check(raw)
            if (
                address is None
                or addresses.is_daemon(address)
                or addresses.key(address) in excluded
            ):
                continue
            block = plaintext.block_for(section, address)
            found.append(
                _classified(
                    address,
                    block,
                    section if len(permanent) + len(temporary) == 1 else "",
                    delayed=delayed,
                )
            )
    return found


def _unique(recipients: list[Recipient]) -> list[Recipient]:
    seen: set[str] = set()
    kept = []
    for recipient in recipients:
        key = addresses.key(recipient.address)
        if key not in seen:
            seen.add(key)
            kept.append(recipient)
    return kept
