"""The pure opt-out policy core: plain values in, a decision out; no I/O, no clock."""

from __future__ import annotations

from suppression.addresses import InvalidAddressError, address_hash, normalise
from suppression.consent import (
    OPERATOR_SOURCES,
    RESUBSCRIBE_SOURCES,
    SELF_SERVICE_SOURCES,
    SOURCES,
    THIRD_PARTY_SHARING,
    ConsentEvent,
    current,
    grant_conflicts,
    is_granted,
)
from suppression.policy import (
    ALLOWED,
    BLOCKING,
    PRECEDENCE,
    SUPPRESSION_REASONS,
    SUPPRESSION_RULES,
    Category,
    Decision,
    Limits,
    Reason,
    RecipientState,
    Scope,
    Suppression,
    Topic,
    decide,
)

__all__ = [
    "ALLOWED",
    "BLOCKING",
    "OPERATOR_SOURCES",
    "PRECEDENCE",
    "RESUBSCRIBE_SOURCES",
    "SELF_SERVICE_SOURCES",
    "SOURCES",
    "SUPPRESSION_REASONS",
    "SUPPRESSION_RULES",
    "THIRD_PARTY_SHARING",
    "Category",
    "ConsentEvent",
    "Decision",
    "InvalidAddressError",
    "Limits",
    "Reason",
    "RecipientState",
    "Scope",
    "Suppression",
    "Topic",
    "address_hash",
    "current",
    "decide",
    "grant_conflicts",
    "is_granted",
    "normalise",
]
