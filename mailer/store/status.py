"""The states of a message (SPEC 5), and the sets of them the code asks about.

The database stores the values as plain text, so a :class:`MessageStatus` compares equal
to the string read back from a row, and the sets below can be tested with either.
"""

from __future__ import annotations

from enum import StrEnum


class MessageStatus(StrEnum):
    """Where one outbox message stands."""

    #: Accepted and waiting for a worker.
    QUEUED = "queued"
    #: Accepted for a future ``send_at``; the sweeper queues it when that time comes.
    SCHEDULED = "scheduled"
    #: Claimed by a worker under a lease; in the SMTP transaction or about to be.
    SENDING = "sending"
    #: The relay answered 250 after the final dot.
    SENT = "sent"
    #: A temporary failure; retried with backoff within the category's age limit.
    DEFERRED = "deferred"
    #: A permanent failure (5xx, too many attempts, expired, would not render).
    FAILED = "failed"
    #: The connection was lost after the final dot: the relay may hold it (RFC 5321 6.1).
    UNKNOWN = "unknown"
    #: The policy refused it, at acceptance or at send time (SPEC 2).
    SUPPRESSED = "suppressed"
    #: A bounce report tied to this message arrived after it left us.
    BOUNCED = "bounced"
    #: A complaint (ARF, provider feedback loop) tied to this message arrived.
    COMPLAINED = "complained"
    #: Never to be sent: its campaign was cancelled or its recipient erased.
    CANCELLED = "cancelled"
    #: Held back by a paused campaign, waiting for resume (SPEC 9).
    HELD = "held"


S = MessageStatus

#: States a message never leaves on its own.
FINAL = frozenset({S.SENT, S.SUPPRESSED, S.FAILED, S.UNKNOWN, S.BOUNCED, S.COMPLAINED,
                   S.CANCELLED})
#: Accepted but not finished: a campaign is not completed while any of its messages is in
#: one of these, and erasing a recipient cancels them (SPEC 3).
PENDING = frozenset({S.QUEUED, S.SCHEDULED, S.SENDING, S.DEFERRED, S.HELD})
#: "Sent or on its way" for the one-time and service-alert cap rules (SPEC 2); a message
#: that ended suppressed, failed, bounced or cancelled does not count.
COUNTED = frozenset({S.QUEUED, S.SCHEDULED, S.SENDING, S.SENT, S.DEFERRED, S.UNKNOWN,
                     S.COMPLAINED})
#: What a campaign pause holds back: accepted but not yet handed to SMTP.
HOLDABLE = frozenset({S.QUEUED, S.DEFERRED})
#: What a campaign cancel ends: everything not yet handed to SMTP.
CANCELLABLE = frozenset({S.QUEUED, S.SCHEDULED, S.DEFERRED, S.HELD})
#: Shown together as "queued" in a campaign's counts: on their way, not yet settled.
QUEUED_LIKE = frozenset({S.QUEUED, S.SCHEDULED, S.SENDING, S.DEFERRED})
#: Handed to a relay, or may have been: only such mail can be the subject of a bounce or
#: complaint report (SPEC 4). Queued, scheduled, suppressed, cancelled and failed messages
#: never left us.
HANDED_TO_RELAY = frozenset({S.SENDING, S.SENT, S.UNKNOWN, S.DEFERRED, S.BOUNCED,
                             S.COMPLAINED})
#: States a report may move to ``bounced`` or ``complained``: the mail left us, or may
#: have, and no earlier report settled it.
REPORTABLE = frozenset({S.SENDING, S.SENT, S.UNKNOWN, S.DEFERRED})

del S
