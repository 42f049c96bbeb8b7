"""What a report read from raw mail says: its kind, its recipients, and our original message."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: Longest diagnostic text kept per recipient; SMTP replies and NDR prose can be long.
MAX_DIAGNOSTIC = 500

#: Most recipients one report may name; the rest are dropped (bounded work per message).
MAX_RECIPIENTS = 1000


class ReportKind(StrEnum):
    """What kind of report a message is (SPEC section 4, "Reading real bounces")."""

    BOUNCE = "bounce"
    COMPLAINT = "complaint"
    #: An ARF report with ``Feedback-Type: opt-out``: the person asked to be taken off.
    UNSUBSCRIBE = "unsubscribe"
    #: Out-of-office and vacation replies: not a bounce, never acted on.
    AUTO_REPLY = "auto_reply"
    UNRECOGNISED = "unrecognised"


@dataclass(frozen=True)
class Recipient:
    """One address a report is about, and what happened to it.

    ``hard`` is True only with evidence of permanence: a 5.x.x status or text saying the
    mailbox does not exist (SPEC section 4). ``policy`` marks a refusal for the sender's
    reasons (X.7.x without such text, a blocklist, SPF/DKIM/DMARC, sender address
    trouble): never hard, and an applier must not count it against the recipient.
    ``delayed`` marks a warning that delivery is still being retried (RFC 3464
    ``Action: delayed``): soft, and no failure yet.
    """

    address: str
    hard: bool = False
    policy: bool = False
    delayed: bool = False
    status: str | None = None
    diagnostic: str | None = None

    def __post_init__(self) -> None:
        """Keep the invariants: a policy refusal or a delay is never hard; text bounded."""
        if self.policy or self.delayed:
            object.__setattr__(self, "hard", False)
        object.__setattr__(self, "diagnostic", clean_diagnostic(self.diagnostic))


@dataclass(frozen=True)
class Report:
    """A report read from one raw message; ``recipients`` is empty unless it names someone.

    ``message_id`` is the Message-ID (without angle brackets) of the message the report
    is about, found in an attached original, quoted headers, or the report's own
    ``In-Reply-To``: ours when we sent it. ``bounce_address`` is the address the report
    was sent to, the original's envelope sender: our VERP address when the original was
    ours. ``envelope_id`` is the RFC 3461 ENVID the original was sent with, if echoed.
    ``source`` names the reader that recognised the report (for metrics and debugging).
    """

    kind: ReportKind
    recipients: tuple[Recipient, ...] = ()
    message_id: str | None = None
    bounce_address: str | None = None
    envelope_id: str | None = None
    feedback_type: str | None = None
    source: str = ""

    @property
    def hard(self) -> tuple[Recipient, ...]:
        """The recipients with a permanent failure."""
        return tuple(r for r in self.recipients if r.hard)


def clean_diagnostic(value: str | None) -> str | None:
    """Collapse whitespace and keep at most :data:`MAX_DIAGNOSTIC` characters."""
    if value is None:
        return None
    text = " ".join(value.split())
    return text[:MAX_DIAGNOSTIC] or None


def unrecognised(source: str = "", message_id: str | None = None) -> Report:
    """Return the report for a message that names no one we can act on."""
    return Report(kind=ReportKind.UNRECOGNISED, message_id=message_id, source=source)
