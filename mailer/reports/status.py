"""Decide hard, soft or policy from a status code and the text around it (SPEC section 4).

The rule: a failure is hard only with evidence of permanence, meaning a 5.x.x status
(RFC 3463) or text saying the mailbox does not exist. Refusals for the sender's reasons
(subject 7, "security or policy", and sender-address statuses X.1.7/X.1.8, or prose about
blocklists, spam and authentication) are the sender's problem: flagged ``policy`` and
never hard, unless their text says the mailbox does not exist (a 5.7.1 "user unknown" is
how several providers report a missing mailbox). Everything else is soft: counted by the
applier, never an immediate suppression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3463 section 2: class "." subject "." detail. The look-arounds keep it out of IP
# addresses and version numbers ("192.0.2.1", "1.5.1.1"); "#5.1.1" (qmail) is fine.
ENHANCED = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d)")

# A basic reply code (RFC 5321 section 4.2): only where replies are quoted, at the start
# of a line, after "smtp;", ">>>"/"<<<", "said:", a colon or a "#", so that numbers in
# prose ("2014", "port 25", "[192.0.2.250]") are not taken for one.
BASIC = re.compile(r"(?:^|[\s:;#(>\[])([245])\d\d(?=[\s\-\]),.;:]|$)", re.M)

# Enhanced codes of class 5 that are still worth retrying: RFC 3463 calls X.2.2 (mailbox
# full) "a persistent transient failure"; X.3.x and X.4.x are trouble at or on the way to
# the receiving system, not a dead mailbox (as the webhook providers' status table reads it).
SOFT_SUBJECTS = frozenset({"3", "4"})
SOFT_CODES = frozenset({"2.2"})
#: RFC 3463 X.1.7 and X.1.8: the SENDER's address is bad. Never the recipient's fault.
SENDER_CODES = frozenset({"1.7", "1.8"})
POLICY_SUBJECT = "7"

#: Text that says the mailbox (or the whole address) does not exist: hard evidence.
NONEXISTENT = re.compile(
    r"user(?:name)? (?:is )?unknown|unknown (?:user|recipient|local.?part|mailbox|address|alias)"
    r"|recipient (?:is )?unknown|no such (?:user|mailbox|recipient|address|account|person)"
    r"|(?:user|mailbox|recipient|account|address|addressee) (?:was )?not found"
    r"|(?:does not|doesn't|no longer) exists?|nonexist|non-exist"
    r"|invalid (?:recipient|mailbox|user|address|account|final delivery userid|userid)"
    r"|not a valid (?:user|mailbox|recipient|account)"
    r"|(?:user|recipient|address|addressee) not known"
    r"|addressee unknown|n'existe pas|existiert nicht|unbekannt|no existe|non esiste|inesistente"
    r"|sconosciut|desconocido|не существует|нет такого|не найден"
    r"|no mailbox (?:here )?by that name|mailbox (?:is )?unavailable for this user"
    r"|not listed in (?:the )?(?:domino directory|public name|address book|directory)"
    r"|recipient name is not recognized|recipnotfound|recipient not recognized"
    r"|(?:account|mailbox|address) (?:has been |is )?"
    r"(?:disabled|deactivated|closed|terminated|suspended|removed|deleted|expired|inactive)"
    r"|(?:user|recipient|mailbox|account) (?:has )?(?:left|moved|no longer)"
    r"|does not have an? [\w.-]+ account|no longer (?:active|valid|in use|available)"
    r"|(?:bad|unknown|invalid) destination mailbox|unrouteable user"
    r"|address rejected: user|user doesn.?t|no account by that name|no such local user"
    r"|is not a known user|unknown or illegal alias|mailbox not found|mailbox name not allowed",
    re.I,
)

#: Text that says the refusal is about the sender, its mail or its reputation.
POLICY = re.compile(
    r"\bspam|block ?list|black ?list|\bblocked\b|\bbanned\b|\brbl\b|dnsbl|spamhaus|spamcop"
    r"|barracuda|reputation|\bspf\b|\bdkim\b|\bdmarc\b|\bpolicy\b|polic(?:y|ies) violation"
    r"|not (?:authori[sz]ed|permitted) to (?:send|relay)"
    r"|relay(?:ing)? (?:denied|not permitted|access denied)"
    r"|sender (?:address )?(?:rejected|denied|blocked|verify failed)|content (?:rejected|filter)"
    r"|\bvirus|malware|unsolicited|bulk mail|too many (?:connections|messages|recipients)"
    r"|rate.?limit|throttl|greylist|graylist|reverse dns|\bptr\b|\brdns\b|listed (?:at|on|in|by)"
    r"|phish|suspicious|authentication (?:required|failed)|\bunauthenticated\b"
    r"|\bmessage (?:rejected|refused) due to"
    r"|access denied|not accepted from|your ip|client host|\bhelo\b|\behlo\b"
    r"|after mail from|unroutable sender|sender address|sender domain|domain of sender",
    re.I,
)

#: Text that says the mailbox is full: a persistent transient failure (RFC 3463 X.2.2).
MAILBOX_FULL = re.compile(
    r"mailbox (?:is )?full|over ?quota|quota exceeded|exceeded (?:the )?(?:storage|quota)"
    r"|(?:storage|disk) (?:space )?(?:quota|limit) exceeded|insufficient (?:storage|disk|space)"
    r"|mailbox size limit|exceeds? (?:its|the|his|her|their)? ?(?:mailbox )?quota"
    r"|mailfolder is full"
    r"|user.{0,20}over.{0,10}quota|is full\b|over (?:\w+ )?quota"
    r"|quota (?:violation|exceeded|full|limit)",
    re.I,
)

#: Text that says the message was too big: a limit of the receiving system (RFC 3463
#: X.3.4), nothing about the mailbox.
MESSAGE_SIZE = re.compile(
    r"message (?:size|too large|too big|length)"
    r"|exceeds? (?:the )?(?:maximum|max|allowed) (?:incoming )?(?:message )?size"
    r"|size limit|too large|too big|maximum (?:incoming |inbound )?message size"
    r"|exceeded maximum inbound message size|exceeds the maximum",
    re.I,
)

#: Text about the sender's own address rather than the recipient's.
SENDER_TEXT = re.compile(
    r"sender address|sender domain|domain of sender|sender's|mail from|envelope.from|return.path",
    re.I,
)


@dataclass(frozen=True)
class Verdict:
    """How one failure reads: ``hard``/``policy`` and the enhanced code it carried."""

    hard: bool
    policy: bool
    status: str | None
    failed: bool = True


def enhanced(text: str | None) -> str | None:
    """Return the first enhanced status code (``"5.1.1"``) in ``text``, else None."""
    if not text:
        return None
    match = ENHANCED.search(text)
    if match is None:
        return None
    return ".".join(str(int(part)) for part in match.groups())


def basic_class(text: str | None) -> str | None:
    """Return the class digit of the first SMTP reply code quoted in ``text``, else None."""
    if not text:
        return None
    match = BASIC.search(text[:4000])
    return match.group(1) if match else None


def says_nonexistent(text: str | None) -> bool:
    """Tell whether ``text`` says the recipient's mailbox does not exist."""
    if not text:
        return False
    match = NONEXISTENT.search(text[:4000])
    if match is None:
        return False
    # "Domain of sender address does not exist" is about our address, not theirs.
    return not (SENDER_TEXT.search(text[:4000]) and not _recipient_words(text[:4000]))


def says_policy(text: str | None) -> bool:
    """Tell whether ``text`` says the refusal is about the sender or its mail."""
    return bool(text) and POLICY.search((text or "")[:4000]) is not None


def says_full(text: str | None) -> bool:
    """Tell whether ``text`` says the mailbox is over quota or the message too big."""
    window = (text or "")[:4000]
    return bool(MAILBOX_FULL.search(window) or MESSAGE_SIZE.search(window))


def classify(status: str | None, text: str | None) -> Verdict:
    """Classify one failed recipient from its status field and diagnostic text.

    ``status`` is the RFC 3464 ``Status`` value when there is one; ``text`` is the
    diagnostic and any prose about this recipient. A generic ``X.0.0`` status gives way
    to a more specific code of the same class found in the text.
    """
    code = enhanced(status)
    from_text = enhanced(text)
    if code is None or (
        code.endswith(".0.0") and from_text is not None and from_text[0] == code[0]
    ):
        code = from_text or code
    klass = code[0] if code else basic_class(status) or basic_class(text)
    nonexistent = says_nonexistent(text)
    policy_text = says_policy(text)
    if klass == "2":
        return Verdict(hard=False, policy=False, status=code, failed=False)
    if klass == "4":
        # A 4.x.x status says "transient" in so many words: soft, whatever the prose.
        return Verdict(hard=False, policy=_policy_code(code) or policy_text, status=code)
    if klass == "5":
        subject_detail = _subject_detail(code)
        subject = subject_detail.split(".")[0] if subject_detail else None
        if subject_detail in SENDER_CODES:
            return Verdict(hard=False, policy=True, status=code)
        if subject_detail and subject == "1":
            # X.1.x (other than the sender codes) is the destination address itself.
            return Verdict(hard=True, policy=False, status=code)
        if nonexistent:
            return Verdict(hard=True, policy=False, status=code)
        if subject == POLICY_SUBJECT or policy_text:
            return Verdict(hard=False, policy=True, status=code)
        if subject in SOFT_SUBJECTS or subject_detail in SOFT_CODES or says_full(text):
            return Verdict(hard=False, policy=False, status=code)
        return Verdict(hard=True, policy=False, status=code)
    # No code at all: only the words can tell.
    if nonexistent and not says_full(text):
        return Verdict(hard=True, policy=False, status=None)
    return Verdict(hard=False, policy=policy_text and not says_full(text), status=None)


def _subject_detail(code: str | None) -> str | None:
    if not code:
        return None
    return code.split(".", 1)[1]


def _policy_code(code: str | None) -> bool:
    detail = _subject_detail(code)
    return detail is not None and (detail.split(".")[0] == POLICY_SUBJECT or detail in SENDER_CODES)


_RECIPIENT_WORDS = re.compile(
    r"recipient|rcpt to|mailbox|user unknown|unknown user|no such user", re.I
)


def _recipient_words(text: str) -> bool:
    return _RECIPIENT_WORDS.search(text) is not None
