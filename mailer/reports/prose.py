"""The prose of a bounce: its failure section, and the words that say what happened.

A report written for people puts its explanation first and a copy of the original
message after it. :func:`report_text` returns the two apart, so that addresses in the
copy (the original's own headers and body) are never read as recipients; the word lists
tell whether the prose speaks of a failure at all, and whether it was given up or is
still being retried. :mod:`mailer.reports.plaintext` reads the recipients from it.
"""

from __future__ import annotations

import re
from email.message import Message

from mailer.reports.message import html_to_text, text_of, walk

#: Characters of report prose read per message; the failure section comes first.
MAX_TEXT = 128 * 1024
#: Lines of the failure section scanned, and characters per line.
MAX_LINES = 3000
MAX_LINE = 1000

# Where the copy of the original message starts.
_DIVIDER = re.compile(
    r"^\s*(?:[-=_*#~+>]{2,}|\*{1,}).*?(?:copy of|original message|unsent message|message text"
    r"|returned message|undelivered message|original headers?|forwarded message|message follows"
    r"|headers? follows?|below this line|original mail|header of the original|message header"
    r"|mensaje original|originalnachricht|message d'origine|messaggio originale)"
    r"|^\s*(?:original message (?:follows|headers?|text)|original message headers"
    r"|the original message headers? (?:is|are|was|were) (?:included|attached|as follows|below)"
    r"|(?:below|here) is a copy of|a copy of the original message"
    r"|the (?:text|headers) of your message"
    r"|your (?:original )?message (?:follows|reads|headers? follows?)|message headers follow"
    r"|-+ ?original message ?-+|original message follows|the header of the original message"
    r"|original message as received|message as (?:it was )?received)",
    re.I,
)

# A header field at the start of a line; a "> " quote prefix is how some MTAs quote.
_HEADER_LINE = re.compile(r"^(?:> ?)?([A-Za-z][A-Za-z0-9-]{0,60}):[ \t]")
_STRONG_HEADERS = frozenset(
    {
        "received",
        "return-path",
        "message-id",
        "mime-version",
        "content-type",
        "dkim-signature",
        "delivered-to",
        "authentication-results",
        "received-spf",
        "x-mailer",
        "x-originating-ip",
        "content-transfer-encoding",
        "references",
        "in-reply-to",
        "arc-seal",
        "list-unsubscribe",
        "thread-index",
        "x-received",
    }
)
_WEAK_HEADERS = frozenset(
    {"from", "to", "cc", "subject", "date", "reply-to", "sender", "importance", "user-agent"}
)

#: Words of a failed delivery: a report must have some before its layout is trusted.
FAILURE_WORDS = re.compile(
    r"undeliver|undelivered|could ?n[o']?t be delivered|can ?n[o']?t be delivered"
    r"|not (?:been |be )?delivered"
    r"|delivery (?:status|failure|failed|has failed|problem|notification|to the following|error)"
    r"|fail|unable to deliver|permanent|fatal|reject|returned mail|did not reach|user unknown"
    r"|unknown user|no such|does not exist|doesn't exist|not found|bounce|non-?deliver"
    r"|mail delivery"
    r"|could not deliver|wasn'?t able to deliver|error|problem delivering|delay|warning|retry|quota"
    r"|unzustellbar|nicht zugestellt|non recapitabile|non remis|no se pudo entregar|не доставлено"
    r"|не может быть доставлено|配信|届きませんでした|送信できません"
    r"|送達できません|無法|无法|退信|失败|失敗",
    re.I,
)

#: Stronger words, asked for when the message does not look like a bounce at all.
STRONG_FAILURE_WORDS = re.compile(
    r"could ?n[o']?t be delivered|undeliverable|delivery (?:has )?failed"
    r"|permanent (?:error|failure)"
    r"|following (?:address(?:es|\(es\))?|recipients?) (?:failed|had)|did not reach|not delivered"
    r"|failure notice|user unknown|unknown user|no such user|does not exist|wasn'?t able to deliver"
    r"|delivery to the following recipient",
    re.I,
)

#: Words of a warning that delivery is still being retried.
DELAY_WORDS = re.compile(
    r"\bdelayed\b|\bdelay\b|will (?:continue to )?(?:retry|try|be retried)"
    r"|still (?:being )?(?:retried|trying)"
    r"|not yet been delivered|has not been delivered yet|warning: could not send|this is a warning"
    r"|warning only|you do not need to resend|no action is required|will keep trying"
    r"|temporarily deferred"
    r"|not been able to deliver (?:it|your message) yet|delivery attempts will continue",
    re.I,
)
#: Words that say the delivery was given up: a failure, whatever else the text says.
FINAL_WORDS = re.compile(
    r"permanent|given up|gave up|giving up|failed permanently|no further attempts"
    r"|will not be retried"
    r"|not be retried|has been deleted|could not be delivered to one or more|retry timeout exceeded"
    r"|undeliverable|fatal",
    re.I,
)


def report_text(message: Message) -> tuple[str, str]:
    """Return ``(failure section, quoted original)`` of the report's own prose.

    Text parts inside an attached original are not the report's; HTML is read only when
    the report has no plain text (Exchange sends both, identical).
    """
    plain: list[str] = []
    markup: list[str] = []
    size = 0
    for part in walk(message):
        if part.in_original or size > MAX_TEXT:
            continue
        if _is_container(part.message):
            continue
        ctype = part.content_type
        if ctype == "text/html":
            markup.append(text_of(part.message))
        elif (
            ctype == "text/plain"
            # A multipart whose boundary could not be read is left as one text leaf.
            or ctype.startswith("multipart/")
            or (part.depth == 0 and not ctype.startswith("message/"))
        ):
            text = text_of(part.message)
            plain.append(text)
            size += len(text)
    texts = plain or [html_to_text(m) for m in markup]
    joined = "\n\n".join(texts)[:MAX_TEXT]
    cut = divider(joined)
    return joined[:cut], joined[cut:]


def divider(text: str) -> int:
    """Return the offset where the copy of the original message starts (len when none)."""
    offset = 0
    lines = text.split("\n")
    for index, line in enumerate(lines[:MAX_LINES]):
        if index > 0 and _DIVIDER.match(line[:MAX_LINE]):
            return offset
        if _header_run(lines, index):
            return offset
        offset += len(line) + 1
    return len(text)


def _header_run(lines: list[str], index: int) -> bool:
    """Tell whether quoted header fields of the original start at line ``index``."""
    match = _HEADER_LINE.match(lines[index][:MAX_LINE])
    if match is None:
        return False
    names = []
    for line in lines[index : index + 8]:
        if line[:1] in (" ", "\t"):
            continue
        found = _HEADER_LINE.match(line[:MAX_LINE])
        if found is None:
            break
        names.append(found.group(1).lower())
    strong = sum(1 for n in names if n in _STRONG_HEADERS or n.startswith(("x-", "arc-")))
    weak = sum(1 for n in names if n in _WEAK_HEADERS)
    return len(names) >= 3 and strong >= 1 and strong + weak >= 3


def _is_container(part: Message) -> bool:
    try:
        return bool(part.is_multipart())
    except Exception:
        return True
