"""Classify SMTP reply and enhanced status codes (RFC 5321, RFC 3463) into event types."""

from __future__ import annotations

import re

from mailer.reports.vocabulary import EventType

# RFC 3463 section 2: class "." subject "." detail, class one of 2/4/5, subject and detail
# one to three digits. The look-arounds keep it from matching inside IP addresses or
# version numbers such as "192.0.2.1" or "1.5.1.1".
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")

# A basic reply code is only trusted at the start of a diagnostic, optionally after the
# RFC 3464 diagnostic-type ("smtp; 550 ..."), so numbers in free text are not taken.
_BASIC = re.compile(r"^\s*(?:[A-Za-z][\w.-]*\s*;\s*)?([245])\d\d(?![\d])")

# Enhanced codes of class 5 that are nonetheless worth retrying, so counted as soft.
# RFC 3463 says X.2.2 (mailbox full) "should be used as a persistent transient failure";
# X.3.x (the receiving mail system) and X.4.x (network and routing) describe trouble at
# or on the way to the receiver, not a dead mailbox.
SOFT_PERMANENT_SUBJECTS: dict[str, str] = {
    "2.2": "mailbox full is transient per RFC 3463",
    "3": "receiving mail system trouble",
    "4": "network or routing trouble",
}

#: Subject 7 is "security or policy status" (RFC 3463 section 3.8): the receiver refused the
#: sender (reputation, authentication, content), not the mailbox.
POLICY_SUBJECT = "7"


def find_enhanced(text: str | None) -> str | None:
    """Return the first enhanced status code (``"5.1.1"``) found in ``text``, else None."""
    if not text:
        return None
    match = _ENHANCED.search(text)
    if match is None:
        return None
    return ".".join(str(int(part)) for part in match.groups())


def _basic_class(text: str | None) -> str | None:
    if not text:
        return None
    match = _BASIC.match(text)
    return match.group(1) if match else None


def classify_status(
    code: str | None, diagnostic: str | None
) -> tuple[EventType, str | None, bool]:
    """Classify a status into ``(event type, enhanced code, policy rejection)``.

    ``code`` may be an enhanced status (``"5.1.1"``) or a basic reply code (``"550"``);
    an enhanced code in ``code`` wins over one found in ``diagnostic``, and either wins
    over a basic reply code. Class 5 is a hard bounce except for the subjects in
    :data:`SOFT_PERMANENT_SUBJECTS`; class 4 is a soft bounce; class 2 is a delivery.
    Anything unreadable is a soft bounce: counted, never an immediate suppression.

    X.7.x of class 4 or 5 is flagged as a policy rejection: SPEC section 4 says policy
    rejections are the sender's problem, and a transient policy deferral (4.7.x, e.g.
    rate limiting for reputation) is just as much about the sender as a 5.7.x refusal.
    """
    enhanced = find_enhanced(code) or find_enhanced(diagnostic)
    if enhanced is not None:
        klass, subject, detail = enhanced.split(".")
        policy = subject == POLICY_SUBJECT and klass in ("4", "5")
        if klass == "2":
            return EventType.DELIVERED, enhanced, False
        if klass == "4":
            return EventType.SOFT_BOUNCE, enhanced, policy
        soft = {subject, f"{subject}.{detail}"} & SOFT_PERMANENT_SUBJECTS.keys()
        return (EventType.SOFT_BOUNCE if soft else EventType.HARD_BOUNCE), enhanced, policy
    basic = _basic_class(code) or _basic_class(diagnostic)
    if basic == "5":
        return EventType.HARD_BOUNCE, None, False
    if basic == "2":
        return EventType.DELIVERED, None, False
    return EventType.SOFT_BOUNCE, None, False


def is_policy(enhanced: str | None) -> bool:
    """Tell whether an enhanced code is a class 4 or 5 security-or-policy status (X.7.x)."""
    if enhanced is None:
        return False
    parts = enhanced.split(".")
    return len(parts) == 3 and parts[0] in ("4", "5") and parts[1] == POLICY_SUBJECT
