"""The message states (SPEC 5) and the sets of them the code asks about."""

from __future__ import annotations

import json

from mailer.store import status
from mailer.store.status import MessageStatus as S

#: The vocabulary of SPEC 5, plus ``held`` (a paused campaign's message, SPEC 9).
SPEC_STATES = {"queued", "scheduled", "sending", "sent", "deferred", "failed", "unknown",
               "suppressed", "bounced", "complained", "cancelled", "held"}


def test_the_states_are_exactly_the_spec_vocabulary_stored_as_plain_text() -> None:
    # Given the enum / When its values are listed / Then they are the SPEC's words
    assert {s.value for s in S} == SPEC_STATES
    # And each compares and hashes as the string a database row gives back
    for state in S:
        assert state == state.value and hash(state) == hash(state.value)
        assert state.value in frozenset({state})
    # And JSON writes the bare string, so API bodies are unchanged
    assert json.dumps({"status": S.SENT}) == '{"status": "sent"}'


def test_every_state_is_either_final_or_pending() -> None:
    # Given the two sets / Then they split the states with nothing left over
    assert status.FINAL.isdisjoint(status.PENDING)
    assert set(S) == status.FINAL | status.PENDING


def test_only_mail_that_went_or_may_go_counts_for_the_one_time_and_cap_rules() -> None:
    # SPEC 2: a message that ended suppressed, failed, bounced or cancelled does not count
    assert status.COUNTED.isdisjoint({S.SUPPRESSED, S.FAILED, S.BOUNCED, S.CANCELLED})
    # while everything accepted and still under way, or delivered, does
    assert {S.QUEUED, S.SCHEDULED, S.SENDING, S.DEFERRED, S.SENT} <= status.COUNTED
    # and a held campaign message waits for a resume that may never come
    assert S.HELD not in status.COUNTED


def test_campaign_sets_act_only_on_what_has_not_reached_smtp() -> None:
    # A pause holds, and a cancel ends, only messages not yet handed to SMTP
    assert status.HOLDABLE <= status.CANCELLABLE <= status.PENDING
    assert S.SENDING not in status.CANCELLABLE
    # And the "queued" count of a campaign covers exactly the unsettled, unheld states
    assert status.PENDING - {S.HELD} == status.QUEUED_LIKE


def test_reports_act_only_on_mail_that_left_us() -> None:
    # SPEC 4: queued, scheduled, suppressed, cancelled and failed mail never left us
    never_left = {S.QUEUED, S.SCHEDULED, S.SUPPRESSED, S.CANCELLED, S.FAILED, S.HELD}
    assert status.HANDED_TO_RELAY.isdisjoint(never_left)
    # And a report moves a message to bounced/complained only once
    assert status.HANDED_TO_RELAY - {S.BOUNCED, S.COMPLAINED} == status.REPORTABLE
