"""Reading the consent ledger: latest wins, revoke wins a tie, no silent re-subscription."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def event(
    granted: bool, at: datetime, source: str = "preference_center", topic: str = "newsletter"
) -> ConsentEvent:
    """A ledger event for the newsletter unless told otherwise."""
    return ConsentEvent(topic=topic, granted=granted, occurred_at=at, source=source)


def test_no_events_means_no_state_and_no_consent() -> None:
    # Marketing consent is never implied (SPEC 2).
    assert current([], "newsletter") is None
    assert not is_granted([], "newsletter")


def test_latest_event_wins_whatever_its_position() -> None:
    # Given a revoke yesterday recorded after a grant today (a late-arriving import)
    grant_today = event(True, NOW)
    revoke_yesterday = event(False, NOW - DAY, "unsubscribe_link")
    # Then today's grant is the current state.
    assert current([grant_today, revoke_yesterday], "newsletter") == grant_today
    assert current([revoke_yesterday, grant_today], "newsletter") == grant_today


def test_events_of_other_topics_are_ignored() -> None:
    # Given a newer revoke of another topic and of third-party sharing
    events = [
        event(True, NOW - DAY),
        event(False, NOW, topic="product_updates"),
        event(False, NOW, topic=THIRD_PARTY_SHARING),
    ]
    # Then the newsletter is still granted, and sharing is revoked on its own.
    assert is_granted(events, "newsletter")
    assert not is_granted(events, THIRD_PARTY_SHARING)


@pytest.mark.parametrize("revoke_first", [True, False])
def test_a_revoke_beats_a_grant_at_the_same_instant(revoke_first: bool) -> None:
    # Given a grant and a revoke with the same occurred_at, in either order
    grant = event(True, NOW, "double_opt_in")
    revoke = event(False, NOW, "unsubscribe_link")
    events = [revoke, grant] if revoke_first else [grant, revoke]
    # Then the revoke is the current state.
    assert current(events, "newsletter") == revoke


_instants = st.sampled_from([NOW - DAY, NOW, NOW + DAY])
_events = st.builds(
    ConsentEvent,
    topic=st.sampled_from(["newsletter", THIRD_PARTY_SHARING]),
    granted=st.booleans(),
    occurred_at=_instants,
    source=st.sampled_from(sorted(SOURCES)),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_events, max_size=8), data=st.data())
def test_current_does_not_depend_on_input_order(
    events: list[ConsentEvent], data: st.DataObject
) -> None:
    # Given the same events in any order (few instants, so ties are common)
    shuffled = data.draw(st.permutations(events))
    # Then the same event is current.
    assert current(shuffled, "newsletter") == current(events, "newsletter")


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_events, max_size=8))
def test_current_is_the_newest_and_a_revoke_if_any_newest_is(events: list[ConsentEvent]) -> None:
    # Given any events, Then the current one is at the newest instant for the topic, and it
    # is a revoke whenever any event at that instant is a revoke.
    mine = [e for e in events if e.topic == "newsletter"]
    chosen = current(events, "newsletter")
    if not mine:
        assert chosen is None
        return
    assert chosen is not None
    newest = max(e.occurred_at for e in mine)
    assert chosen.occurred_at == newest
    if any(not e.granted for e in mine if e.occurred_at == newest):
        assert not chosen.granted


def test_source_sets_follow_the_spec() -> None:
    expected = {
        "signup_form",
        "preference_center",
        "double_opt_in",
        "unsubscribe_link",
        "one_click",
        "mailto",
        "complaint",
        "api",
        "import",
        "admin",
    }
    assert expected == SOURCES
    assert {"import", "api", "admin"} == OPERATOR_SOURCES
    assert not SELF_SERVICE_SOURCES & OPERATOR_SOURCES
    assert RESUBSCRIBE_SOURCES <= SELF_SERVICE_SOURCES


REVOKED = [event(True, NOW - 2 * DAY, "signup_form"), event(False, NOW - DAY, "one_click")]
GRANTED = [event(False, NOW - 2 * DAY, "unsubscribe_link"), event(True, NOW - DAY)]


@pytest.mark.parametrize(
    ("history", "source", "has_evidence", "conflicts"),
    [
        # After a revoke, operators cannot turn it back to yes.
        pytest.param(REVOKED, "import", False, True, id="revoked-import"),
        pytest.param(REVOKED, "api", True, True, id="revoked-api-even-with-evidence"),
        pytest.param(REVOKED, "admin", False, True, id="revoked-admin"),
        # ...and a signup form counts as the person's own action only with evidence.
        pytest.param(REVOKED, "signup_form", False, True, id="revoked-signup-no-evidence"),
        pytest.param(REVOKED, "signup_form", True, False, id="revoked-signup-with-evidence"),
        pytest.param(REVOKED, "preference_center", False, False, id="revoked-preference-center"),
        pytest.param(REVOKED, "double_opt_in", False, False, id="revoked-double-opt-in"),
        # Revoke-only sources never grant.
        pytest.param(REVOKED, "unsubscribe_link", False, True, id="revoked-unsubscribe-link"),
        pytest.param(REVOKED, "complaint", False, True, id="revoked-complaint"),
        # Nothing to conflict with when there is no revoke in force.
        pytest.param([], "import", False, False, id="no-history-import"),
        pytest.param([], "signup_form", False, False, id="no-history-signup"),
        pytest.param(GRANTED, "api", False, False, id="granted-api"),
        pytest.param(GRANTED, "admin", False, False, id="granted-admin"),
    ],
)
def test_grant_conflicts(
    history: list[ConsentEvent], source: str, has_evidence: bool, conflicts: bool
) -> None:
    # Given a ledger history, When a grant from this source arrives, Then it is refused or not.
    assert grant_conflicts(history, "newsletter", source, has_evidence=has_evidence) is conflicts


def test_grant_conflict_uses_the_tie_rule() -> None:
    # Given a grant and a revoke at the same instant, the revoke is in force
    history = [event(True, NOW, "signup_form"), event(False, NOW, "unsubscribe_link")]
    # Then an import grant is refused.
    assert grant_conflicts(history, "newsletter", "import")


def test_grant_conflict_is_per_topic() -> None:
    # Given a revoke of product_updates only, Then an import grant of the newsletter is fine.
    history = [event(False, NOW, "unsubscribe_link", topic="product_updates")]
    assert not grant_conflicts(history, "newsletter", "import")
    assert grant_conflicts(history, "product_updates", "import")


def test_grant_conflict_applies_to_third_party_sharing() -> None:
    history = [event(False, NOW, "preference_center", topic=THIRD_PARTY_SHARING)]
    assert grant_conflicts(history, THIRD_PARTY_SHARING, "admin")


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="source"):
        grant_conflicts([], "newsletter", "carrier_pigeon")
