"""The policy decision: may this message go to this recipient now, and if not, why (SPEC 2)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import ClassVar

from suppression.consent import (
    RESUBSCRIBE_SOURCES,
    THIRD_PARTY_SHARING,
    ConsentEvent,
    current,
)


class Category(StrEnum):
    """The kind of a message, declared by its template; it fixes which rules apply."""

    REGISTRATION_CONFIRMATION = "registration_confirmation"
    SERVICE_ALERT = "service_alert"
    LEGAL_NOTICE = "legal_notice"
    PROMOTION = "promotion"


class Reason(StrEnum):
    """Why a message is ``suppressed``; the codes are part of the API contract."""

    NO_CONSENT = "no_consent"
    UNSUBSCRIBED = "unsubscribed"
    COMPLAINT = "complaint"
    HARD_BOUNCE = "hard_bounce"
    SOFT_BOUNCE_LIMIT = "soft_bounce_limit"
    MANUAL = "manual"
    ERASED = "erased"
    NO_ACCOUNT = "no_account"
    FREQUENCY_CAP = "frequency_cap"
    ALREADY_SENT = "already_sent"
    THIRD_PARTY_NOT_ALLOWED = "third_party_not_allowed"
    INVALID_ADDRESS = "invalid_address"


class Scope(StrEnum):
    """What a suppression entry covers: every message, or marketing only."""

    ALL = "all"
    MARKETING = "marketing"


#: The reasons a suppression-list entry can carry (SPEC section 4).
SUPPRESSION_REASONS = frozenset(
    {
        Reason.HARD_BOUNCE,
        Reason.SOFT_BOUNCE_LIMIT,
        Reason.COMPLAINT,
        Reason.UNSUBSCRIBED,
        Reason.MANUAL,
        Reason.ERASED,
    }
)

#: When several reasons apply, the first in this order is reported. Facts about the address
#: come first (it cannot be sent to at all), then the strongest and least reversible blocks
#: (erasure, hard bounce, an operator's block, a spam complaint), then the recipient's own
#: choices, and last the rules about this particular send (caps, one-time). This keeps the
#: reason stable when a recipient's state changes in an unrelated way.
PRECEDENCE: tuple[Reason, ...] = (
    Reason.INVALID_ADDRESS,
    Reason.ERASED,
    Reason.HARD_BOUNCE,
    Reason.MANUAL,
    Reason.COMPLAINT,
    Reason.SOFT_BOUNCE_LIMIT,
    Reason.UNSUBSCRIBED,
    Reason.NO_ACCOUNT,
    Reason.NO_CONSENT,
    Reason.THIRD_PARTY_NOT_ALLOWED,
    Reason.FREQUENCY_CAP,
    Reason.ALREADY_SENT,
)
_RANK: Mapping[str, int] = {reason: rank for rank, reason in enumerate(PRECEDENCE)}

_ALL_ONLY = frozenset({Scope.ALL})
_ANY_SCOPE = frozenset({Scope.ALL, Scope.MARKETING})

#: Which suppression reasons block which category, and in which scopes: the "blocked by"
#: and "ignores" columns of the SPEC section 2 matrix. A ``marketing`` entry never stops a
#: transactional message, except that a complaint in any scope stops service alerts.
#: ``soft_bounce_limit`` blocks promotions only, as the normative matrix says, although the
#: entry is written with scope ``all``; ``erased`` blocks promotions only, so that a person
#: who registers again after erasure still gets their confirmation.
SUPPRESSION_RULES: Mapping[Category, Mapping[str, frozenset[Scope]]] = {
    Category.REGISTRATION_CONFIRMATION: {
        Reason.HARD_BOUNCE: _ALL_ONLY,
        Reason.MANUAL: _ALL_ONLY,
    },
    Category.SERVICE_ALERT: {
        Reason.HARD_BOUNCE: _ALL_ONLY,
        Reason.MANUAL: _ALL_ONLY,
        Reason.COMPLAINT: _ANY_SCOPE,
    },
    # Legal notices ignore unsubscribes and complaints: the law requires them to be sent.
    # A blocked one is still recorded as suppressed so the sender has evidence (SPEC 2).
    Category.LEGAL_NOTICE: {
        Reason.HARD_BOUNCE: _ALL_ONLY,
        Reason.MANUAL: _ALL_ONLY,
    },
    Category.PROMOTION: {
        Reason.ERASED: _ANY_SCOPE,
        Reason.HARD_BOUNCE: _ANY_SCOPE,
        Reason.MANUAL: _ANY_SCOPE,
        Reason.COMPLAINT: _ANY_SCOPE,
        Reason.SOFT_BOUNCE_LIMIT: _ANY_SCOPE,
        Reason.UNSUBSCRIBED: _ANY_SCOPE,
    },
}

#: Which suppression reasons can block each category, so a store can pre-filter its query.
BLOCKING: Mapping[Category, frozenset[str]] = {
    category: frozenset(rules) for category, rules in SUPPRESSION_RULES.items()
}


@dataclass(frozen=True, slots=True)
class Suppression:
    """One active suppression-list entry for the recipient's address.

    ``created_at`` lets a later opt-in by the recipient's own action lift an
    ``unsubscribed`` entry for that topic (SPEC 4); when unknown the entry always holds.
    """

    scope: str
    reason: str
    expires_at: datetime | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        # Fail loudly on a value we do not understand rather than silently not blocking.
        if self.scope not in _ANY_SCOPE:
            raise ValueError("suppression scope must be 'all' or 'marketing'")
        if self.reason not in SUPPRESSION_REASONS:
            raise ValueError("unknown suppression reason")


@dataclass(frozen=True, slots=True)
class Topic:
    """A marketing topic as the policy sees it."""

    name: str
    third_party: bool = False


@dataclass(frozen=True, slots=True)
class RecipientState:
    """Everything the policy needs to know about one recipient, loaded by the caller.

    ``prior_sends`` are the ``created_at`` of earlier messages of the same category to this
    recipient that count: the caller leaves out the message being decided, ones that ended
    ``suppressed``, ``failed``, ``bounced`` or ``cancelled``, and system consent
    confirmations (which the one-time rule does not count, SPEC 3).
    """

    address_valid: bool = True
    account_active: bool = False
    suppressions: tuple[Suppression, ...] = ()
    consents: tuple[ConsentEvent, ...] = ()
    prior_sends: tuple[datetime, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    """Configured limits the policy enforces (``MAILER_SERVICE_ALERT_*``)."""

    service_alert_limit: int = 3
    service_alert_window: timedelta = timedelta(days=7)

    def __post_init__(self) -> None:
        if self.service_alert_limit < 0:
            raise ValueError("service_alert_limit must not be negative")
        if self.service_alert_window <= timedelta(0):
            raise ValueError("service_alert_window must be positive")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome: allowed, or not allowed with exactly one reason."""

    allowed: bool
    reason: Reason | None = None

    #: The one "allowed" decision, shared so that ``decide`` allocates nothing on success.
    ALLOWED: ClassVar[Decision]

    def __post_init__(self) -> None:
        if self.allowed == (self.reason is not None):
            raise ValueError("a decision is either allowed or has a reason, never both")

    @classmethod
    def deny(cls, reason: Reason) -> Decision:
        """Return the shared "not allowed" decision for ``reason``."""
        return _DENIALS[Reason(reason)]


Decision.ALLOWED = Decision(allowed=True)
ALLOWED = Decision.ALLOWED
_DENIALS: Mapping[Reason, Decision] = {
    reason: Decision(allowed=False, reason=reason) for reason in Reason
}
_DEFAULT_LIMITS = Limits()


def _lifted_by_opt_in(entry: Suppression, consent: ConsentEvent | None) -> bool:
    """Whether a newer opt-in by the recipient's own action lifts an ``unsubscribed`` entry."""
    return (
        entry.created_at is not None
        and consent is not None
        and consent.granted
        and consent.source in RESUBSCRIBE_SOURCES
        and consent.occurred_at > entry.created_at
    )


def _recent_count(sends: tuple[datetime, ...], since: datetime) -> int:
    """Count sends after ``since``; later-than-now ones count too (another host's clock)."""
    count = 0
    for created_at in sends:
        if created_at > since:
            count += 1
    return count


def decide(
    category: Category,
    topic: Topic | None,
    state: RecipientState,
    now: datetime,
    limits: Limits = _DEFAULT_LIMITS,
) -> Decision:
    """Apply the SPEC section 2 matrix; pure, no I/O, and cheap enough to run per message.

    Every datetime passed in (``now``, suppression and consent times, ``prior_sends``) must
    use one convention, timezone-aware UTC by preference. A promotion needs a ``topic``;
    leaving it out is a programming error and raises :class:`ValueError`.
    """
    rules = SUPPRESSION_RULES.get(category)
    if rules is None:
        raise ValueError("unknown message category")
    if category == Category.PROMOTION and topic is None:
        raise ValueError("a promotion needs a topic")
    if not state.address_valid:
        return _DENIALS[Reason.INVALID_ADDRESS]

    # Promotions need the topic's consent for the "lift" rule below and for the opt-in
    # check; other categories never look at consent (none is needed, SPEC 2).
    topic_consent: ConsentEvent | None = None
    if topic is not None and category == Category.PROMOTION:
        topic_consent = current(state.consents, topic.name)

    blocked: Reason | None = None
    for entry in state.suppressions:
        scopes = rules.get(entry.reason)
        if scopes is None or entry.scope not in scopes:
            continue
        if entry.expires_at is not None and entry.expires_at <= now:
            continue
        if entry.reason == Reason.UNSUBSCRIBED and _lifted_by_opt_in(entry, topic_consent):
            continue
        if blocked is None or _RANK[entry.reason] < _RANK[blocked]:
            blocked = Reason(entry.reason)
    if blocked is not None:
        # Every suppression reason outranks every rule checked below (see PRECEDENCE).
        return _DENIALS[blocked]

    if category == Category.PROMOTION:
        assert topic is not None  # checked above; narrows the type for mypy
        # Marketing consent is never implied: no event at all means no (SPEC 2).
        if topic_consent is None:
            return _DENIALS[Reason.NO_CONSENT]
        if not topic_consent.granted:
            return _DENIALS[Reason.UNSUBSCRIBED]
        if topic.third_party:
            sharing = current(state.consents, THIRD_PARTY_SHARING)
            if sharing is None or not sharing.granted:
                return _DENIALS[Reason.THIRD_PARTY_NOT_ALLOWED]
        return ALLOWED

    if category == Category.SERVICE_ALERT:
        if not state.account_active:
            return _DENIALS[Reason.NO_ACCOUNT]
        # A rolling window: sends strictly after now - window count against the cap.
        since = now - limits.service_alert_window
        if _recent_count(state.prior_sends, since) >= limits.service_alert_limit:
            return _DENIALS[Reason.FREQUENCY_CAP]
        return ALLOWED

    if category == Category.REGISTRATION_CONFIRMATION:
        # One-time per recipient: the caller passes only earlier ones that still count.
        if state.prior_sends:
            return _DENIALS[Reason.ALREADY_SENT]
        return ALLOWED

    # Legal notices: nothing beyond the suppression rules (no consent, no caps).
    return ALLOWED
