"""Consent ledger events and the rules that read the current state out of them (SPEC 3)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

#: The ledger topic recording consent to pass data to partner companies; a promotion on a
#: ``third_party`` topic needs it as well as the topic's own opt-in (SPEC section 2).
THIRD_PARTY_SHARING = "third_party_sharing"

#: Sources that are the recipient's own action (forms, links and pages they used, and the
#: ``mailto:`` of List-Unsubscribe, RFC 2369, answered by their own mailbox).
SELF_SERVICE_SOURCES = frozenset(
    {"signup_form", "preference_center", "double_opt_in", "unsubscribe_link", "one_click",
     "mailto"}
)

#: Sources that are someone else acting for the recipient (bulk import, a service, staff).
OPERATOR_SOURCES = frozenset({"import", "api", "admin"})

#: Every source the ledger accepts; ``complaint`` is the revoke written for a spam report.
SOURCES = SELF_SERVICE_SOURCES | OPERATOR_SOURCES | frozenset({"complaint"})

#: Sources whose grant may turn an earlier revoke back into a yes: only the recipient's own
#: opt-in actions (SPEC 3, "No silent re-subscription"); ``signup_form`` also needs evidence.
RESUBSCRIBE_SOURCES = frozenset({"signup_form", "preference_center", "double_opt_in"})


@dataclass(frozen=True, slots=True)
class ConsentEvent:
    """One append-only grant or revoke of a topic (or of third-party sharing)."""

    topic: str
    granted: bool
    occurred_at: datetime
    source: str


def _supersedes(event: ConsentEvent, best: ConsentEvent) -> bool:
    """Whether ``event`` is the current state rather than ``best`` (a strict total order)."""
    if event.occurred_at != best.occurred_at:
        return event.occurred_at > best.occurred_at
    if event.granted != best.granted:
        # Same instant: the revoke wins, so a race between "yes" and "no" ends in "no".
        return not event.granted
    # Same instant, same answer: any fixed order keeps the result independent of input order.
    return event.source > best.source


def current(events: Iterable[ConsentEvent], topic: str) -> ConsentEvent | None:
    """Return the event that decides ``topic`` now: the newest, a revoke on a tie; else None."""
    best: ConsentEvent | None = None
    for event in events:
        if event.topic == topic and (best is None or _supersedes(event, best)):
            best = event
    return best


def is_granted(events: Iterable[ConsentEvent], topic: str) -> bool:
    """Whether the current state of ``topic`` is an active opt-in (never implied by default)."""
    event = current(events, topic)
    return event is not None and event.granted


def grant_conflicts(
    events: Iterable[ConsentEvent], topic: str, source: str, *, has_evidence: bool = False
) -> bool:
    """Whether a grant from ``source`` must be refused (409 ``consent_conflict``).

    Once the current event for the topic is a revoke, only the recipient's own opt-in
    (``preference_center``, ``double_opt_in``, or ``signup_form`` with evidence such as the
    form URL and IP) may turn it back to yes (SPEC 3). Revoke-only sources and operator
    sources conflict. The caller must also refuse a grant dated in the future, or it would
    outrank the next real unsubscribe under "latest wins".
    """
    if source not in SOURCES:
        raise ValueError("unknown consent source")
    latest = current(events, topic)
    if latest is None or latest.granted:
        return False
    if source == "signup_form":
        return not has_evidence
    return source not in RESUBSCRIBE_SOURCES
