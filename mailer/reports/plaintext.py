"""Recipients in bounces written as prose: Exim, qmail, Postfix and Sendmail text,
Exchange, Domino, Courier, mailbox providers (Gmail, Yahoo, mail.ru, GMX...), the long tail.

No two MTAs word a bounce alike, but they lay it out in a few shapes, and this reader
works on the shapes rather than on each MTA's sentences:

- the failure section (:mod:`mailer.reports.prose`) is the text before the copy of the
  original (a divider line such as Exim's "------ This is a copy of the message" or
  qmail's "--- Below this line is a copy of the message.", or a run of quoted header
  fields); addresses after it belong to the original message and are never read as
  recipients;
- a failed recipient stands on a line of its own (Exim, Gmail, Domino, Sendmail's
  "permanent fatal errors" list), opens a line followed by a colon and the reason (qmail,
  Postfix, Yahoo, Courier, GMX), carries a display name (Exchange), is quoted in an SMTP
  reply ("550 5.1.1 <a@b>... User unknown", "RCPT TO:<a@b>" then a 5xx), or shares a line
  with words of failure ("Unknown user: a@b", "Your message to a@b couldn't be delivered");
- the prose after a recipient, up to the next one, is its diagnostic.

The addresses of the report's own sender and receiver, the original's sender, and mail
systems (MAILER-DAEMON, postmaster) are never recipients.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailer.reports import addresses
from mailer.reports.prose import (
    DELAY_WORDS,
    FAILURE_WORDS,
    FINAL_WORDS,
    MAX_LINE,
    MAX_LINES,
    STRONG_FAILURE_WORDS,
)

#: Lines after a recipient read as its diagnostic.
MAX_BLOCK_LINES = 12

_A = addresses.ADDRESS.pattern
_ADDR = rf"(?P<addr>{_A})"

# A line that is only an address: "  a@b", "<a@b>:", "1. a@b", "\"a@b\":".
_ADDR_ONLY = re.compile(
    rf"^\s*(?:\d{{1,3}}[.)]\s+|[-*\u2022]\s+)?[<\"'\[]?(?:mailto:|smtp:)?{_ADDR}[>\"'\]]?"
    r"\s*[:,;.]?\s*$",
    re.I,
)
# A display name and an address: Exchange's "John Smith<mailto:a@b>", "Name <a@b>",
# "a@b (a@b)", "Name (a@b)".
_NAME_ADDR = re.compile(
    rf"^\s*(?:\"[^\"]{{0,80}}\"|[^<>:;,()\[\]\"]{{0,60}}?)\s*(?:[<\[](?:mailto:|smtp:)?{_ADDR}[>\]]"
    rf"|\(<?{_ADDR.replace('addr', 'paddr')}>?\))"
    r"\s*[:,;.]?\s*$",
    re.I,
)
# A line that points people somewhere ("please contact <postmaster@...>") names no recipient.
_CONTACT = re.compile(r"contact|reply to|write to|send (?:e-?)?mail to|assistance|question", re.I)
# Exchange 2003: "a@b on Thu, 29 Apr 2010 ..."
_ADDR_ON = re.compile(rf"^\s*<?{_ADDR}>?\s+on\s+\w{{3}}", re.I)
# qmail, Postfix text, Yahoo, Courier, GMX: "<a@b>: reason", "a@b (expanded from <c@d>): ...",
# Sendmail's "a@b... User unknown", "a@b (reason: 550 ...)".
_ADDR_REASON = re.compile(
    rf"^\s*[<\"']?{_ADDR}[>\"']?\s*"
    rf"(?:\((?:expanded|generated) from:?\s*<?(?P<alias>{_A})>?\)\s*)?"
    r"(?::|\.\.\.|\s-{1,2}\s|\s(?=\((?:reason|error|status|user|mailbox)))\s*(?P<rest>.*)$",
    re.I,
)
# "(generated from c@d)" on the line after Exim's recipient: the address we mailed.
_GENERATED = re.compile(rf"^\s*\(?(?:generated|expanded) from:?\s*<?(?P<alias>{_A})>?\)?", re.I)
# An SMTP reply quoting the address: "<<< 550 5.1.1 <a@b>... User unknown".
_REPLY_ADDR = re.compile(
    rf"(?:^|[\s:;#(>])(?P<code>[45]\d\d)[\s-](?:[^<>@\n]{{0,80}}?)[<\"'\s]{_ADDR}", re.I
)
# "unable to deliver your message to a@b", "Delivery to a@b failed".
_TO_ADDR = re.compile(
    r"(?:unable to deliver|could ?n[o']?t (?:be )?deliver(?:ed)?"
    r"|can ?n[o']?t (?:be )?deliver(?:ed)?"
    r"|(?:not|never) (?:be |been )?delivered|delivery (?:has )?failed|failed to deliver"
    r"|undeliverable"
    rf"|could not send|(?:message|mail),? addressed)\b[^@\n]{{0,60}}?\bto:?\s*[<\"']?{_ADDR}"
    rf"|delivery to:?\s*[<\"']?{_ADDR.replace('addr', 'daddr')}[>\"']?\s+(?:has )?failed",
    re.I,
)
_ERROR_REPLY = re.compile(r"(?:^|[\s:;#(>\[])[45]\d\d(?:[\s-]|$)")
_RCPT_TO = re.compile(rf"rcpt\s+to:?\s*<?{_ADDR}", re.I)
_REPLY = re.compile(
    r"(?:^|[\s:;#(>])[45]\d\d[\s-]|\b[45]\.\d{1,3}\.\d{1,3}\b|error|failed|rejected", re.I
)

# Words on a line that say its address failed (the fallback when no layout matched).
_LINE_FAILURE = re.compile(
    r"unknown user|user unknown|no such (?:user|mailbox|recipient|address)"
    r"|invalid (?:recipient|mailbox|address|user)"
    r"|recipient (?:address )?rejected|unknown recipient|recipient unknown|does not exist"
    r"|doesn'?t exist"
    r"|not found|mailbox (?:unavailable|full|is full|not found|disabled)|over ?quota|quota exceeded"
    r"|undeliverable|undelivered|could ?n[o']?t be delivered|can ?n[o']?t be delivered"
    r"|not (?:be )?delivered"
    r"|delivery (?:to .{0,200})?(?:has )?failed|failed to deliver|unable to deliver"
    r"|could not deliver"
    r"|permanent(?:ly)? fail|fatal error|bounced|rejected|not a valid|disabled|deactivated"
    r"|not listed"
    r"|is not accepting|refused|did not reach|wasn'?t able to deliver|no longer"
    r"|did not (?:exactly )?match",
    re.I,
)

# A header-like line in the failure section ("From: a@b", "To: a@b"): not a recipient line.
_HEADERISH = re.compile(
    r"^\s*(?:from|sender|reply-to|return-path|date|subject|message-id|received|to|cc|bcc"
    r"|delivered-to|x-[\w-]+|envelope-to|for|by|reporting-mta|received-from-mta)\s*:",
    re.I,
)
_SUMMARY_TO = re.compile(r"^\s*to\s*:\s*\S", re.I)
_RECIPIENTS_HEADING = re.compile(r"following (?:recipients?|addresses|users?)\b.*:\s*$", re.I)
_BARE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_SENDER_CONTEXT = re.compile(
    r"\bmail from\b|\bsender\b|\bfrom:?\s*<|envelope-from|return-path", re.I
)

@dataclass(frozen=True)
class Finding:
    """One failed recipient found in prose, with the prose about it."""

    address: str
    block: str
    structural: bool


@dataclass
class TextReport:
    """The prose of a report: its failure section, the quoted original, and findings."""

    section: str = ""
    quoted: str = ""
    findings: list[Finding] = field(default_factory=list)
    delayed: bool = False


def read(
    section: str, excluded: set[str], *, strict: bool = False, subject: str = ""
) -> TextReport:
    """Find the failed recipients in a failure ``section`` of report prose.

    ``excluded`` holds lower-cased addresses that are never recipients (the report's
    sender and receiver, the original's sender). ``strict`` asks for stronger failure
    words before a layout is trusted, for messages that do not look like bounces.
    """
    report = TextReport(section=section)
    lines = [line[:MAX_LINE].rstrip() for line in section.split("\n")[:MAX_LINES]]
    gate = STRONG_FAILURE_WORDS if strict else FAILURE_WORDS
    if not (gate.search(section) or gate.search(subject)):
        return report
    report.delayed = bool(
        (DELAY_WORDS.search(section) or DELAY_WORDS.search(subject))
        and not FINAL_WORDS.search(section)
        and not FINAL_WORDS.search(subject)
    )
    structural = _structural(lines, excluded)
    if structural:
        report.findings = structural
        return report
    loose = _loose(lines, excluded)
    if loose:
        report.findings = loose
        return report
    if not strict:
        report.findings = _single(lines, excluded) or _summary_to(lines, excluded)
    return report


def block_for(section: str, address: str) -> str:
    """Return the prose about ``address``: its line and what follows, up to a blank line."""
    lines = section.split("\n")[:MAX_LINES]
    wanted = address.lower()
    for index, line in enumerate(lines):
        if wanted in line.lower():
            return _block(lines, index)
    return ""


def _structural(lines: list[str], excluded: set[str]) -> list[Finding]:
    """Recipients found by layout: own line, address-colon-reason, SMTP transcripts."""
    marks: list[tuple[int, str]] = []  # (line index, address)
    # Exim and Postfix name the alias we mailed next to what it expanded to; every later
    # mention of the expansion stands for the alias (SPEC 4 prefers the mailed address).
    aliases: dict[str, str] = {}
    # An SMTP error reply anywhere in the section makes every "RCPT TO:<a@b>" a recipient
    # the error may be about (Apache James lists it under "Message details").
    replied = any(_ERROR_REPLY.search(line) for line in lines)
    alone: set[int] = set()
    for index, line in enumerate(lines):
        if _HEADERISH.match(line):
            continue
        own_line = _ADDR_ONLY.match(line)
        match = own_line or (
            None if _CONTACT.search(line) else _NAME_ADDR.match(line) or _ADDR_ON.match(line)
        )
        if match is not None:
            address = match.groupdict().get("addr") or match.groupdict().get("paddr") or ""
            alias = _alias_after(lines, index)
            if alias:
                aliases[address.lower()] = alias
            if own_line is not None and not alias:
                # Alone on its line in a failure list, postmaster@ is a recipient, not
                # a contact (some providers' test bounces use it).
                alone.add(index)
            marks.append((index, alias or address))
            continue
        reason = _ADDR_REASON.match(line)
        if reason is not None:
            if reason.group("alias"):
                aliases[reason.group("addr").lower()] = reason.group("alias")
            marks.append((index, reason.group("alias") or reason.group("addr")))
            continue
        directed = _TO_ADDR.search(line)
        if directed is not None and not _SENDER_CONTEXT.search(line):
            marks.append((index, directed.group("addr") or directed.group("daddr")))
        for reply in _REPLY_ADDR.finditer(line):
            if not _SENDER_CONTEXT.search(line):
                marks.append((index, reply.group("addr")))
        rcpt = _RCPT_TO.search(line)
        if rcpt is not None and (
            replied or any(_REPLY.search(n) for n in lines[index : index + 3])
        ):
            marks.append((index, rcpt.group("addr")))
    marks = [(index, aliases.get(address.lower(), address)) for index, address in marks]
    return _findings(lines, marks, excluded, structural=True, alone=alone)


def _loose(lines: list[str], excluded: set[str]) -> list[Finding]:
    """Recipients found only by sharing a line with words of failure."""
    marks: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        if _HEADERISH.match(line) or not _LINE_FAILURE.search(line):
            continue
        if _SENDER_CONTEXT.search(line):
            continue
        for address in addresses.find(line):
            marks.append((index, address))
    return _findings(lines, marks, excluded, structural=False)


def _single(lines: list[str], excluded: set[str]) -> list[Finding]:
    """The last resort: a failure section that names exactly one possible recipient."""
    candidates: dict[str, tuple[int, str]] = {}
    for index, line in enumerate(lines):
        if _HEADERISH.match(line) or _SENDER_CONTEXT.search(line):
            continue
        for address in addresses.find(line):
            if _usable(address, excluded):
                candidates.setdefault(addresses.key(address), (index, address))
    if len(candidates) != 1:
        return []
    index, address = next(iter(candidates.values()))
    return [Finding(address, _block(lines, index), structural=False)]


def _summary_to(lines: list[str], excluded: set[str]) -> list[Finding]:
    """A bounce that names no recipient but sums up the failed message: its lone "To:"."""
    found: dict[str, tuple[int, str]] = {}
    for index, line in enumerate(lines):
        if _SUMMARY_TO.match(line):
            for address in addresses.find(line):
                if _usable(address, excluded):
                    found.setdefault(addresses.key(address), (index, address))
    if len(found) != 1:
        return []
    index, address = next(iter(found.values()))
    return [Finding(address, _block(lines, index), structural=False)]


def bare_names(section: str, domain: str) -> list[str]:
    """AOL lists failed screen names without a domain under "the following recipients"."""
    lines = section.split("\n")[:MAX_LINES]
    names: list[str] = []
    listing = False
    for line in lines:
        if _RECIPIENTS_HEADING.search(line):
            listing = True
            continue
        if listing:
            token = line.strip()
            if not token:
                if names:
                    break
                continue
            if not _BARE_NAME.fullmatch(token):
                break
            names.append(f"{token}@{domain}")
    return names[:MAX_LINES]


def _findings(
    lines: list[str],
    marks: list[tuple[int, str]],
    excluded: set[str],
    *,
    structural: bool,
    alone: set[int] | None = None,
) -> list[Finding]:
    found: dict[str, Finding] = {}
    alone = alone or set()
    checked = [(index, addresses.check(raw)) for index, raw in marks]
    for index, address in checked:
        if address is None or not _usable(address, excluded, postmaster=index in alone):
            continue
        if addresses.key(address) in found:
            continue
        # The prose about a recipient runs to the next line that names someone else; its
        # own address quoted again in the SMTP reply below it belongs to it.
        stop = next(
            (
                at
                for at, other in checked
                if at > index
                and other is not None
                and addresses.key(other) != addresses.key(address)
            ),
            None,
        )
        block = _block(lines, index, stop=stop)
        found[addresses.key(address)] = Finding(address, block, structural)
    return list(found.values())


def _block(lines: list[str], index: int, *, stop: int | None = None) -> str:
    """Return a recipient's prose: its line and the lines up to a blank line or ``stop``."""
    taken = [lines[index]]
    blank_skipped = False
    for offset, line in enumerate(lines[index + 1 : index + 1 + MAX_BLOCK_LINES * 2]):
        at = index + 1 + offset
        if stop is not None and at >= stop:
            break
        if not line.strip():
            # One blank line between a recipient and its reason is common (Gmail).
            if len(taken) <= 1 and not blank_skipped:
                blank_skipped = True
                continue
            break
        taken.append(line)
        if len(taken) > MAX_BLOCK_LINES:
            break
    return "\n".join(taken)


def _alias_after(lines: list[str], index: int) -> str | None:
    """Exim's "(generated from alias@b)" under a recipient names the address we mailed."""
    if index + 1 < len(lines):
        match = _GENERATED.match(lines[index + 1])
        if match is not None:
            return match.group("alias")
    return None


def _usable(address: str, excluded: set[str], *, postmaster: bool = False) -> bool:
    if addresses.key(address) in excluded:
        return False
    if postmaster and address.split("@", 1)[0].lower() == "postmaster":
        return True
    return not addresses.is_daemon(address)
