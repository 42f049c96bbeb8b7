"""What the policy is told about a recipient, gathered in bulk (``load_states``)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select

from mailer.runtime import Runtime
from mailer.store.facts import Target, load_states
from mailer.store.outbox import insert_messages
from mailer.store.recipients import record_consent, upsert_recipient
from mailer.store.schema import recipients
from mailer.store.status import MessageStatus as S
from suppression.policy import Category
from tests.units import message_row, unit_runtime


def _person(rt: Runtime, email: str) -> tuple[int, str]:
    """A profile that granted the newsletter; its id and the hash of its address."""
    now = rt.clock()
    external_id = f"unit-{uuid.uuid4().hex[:12]}"
    with rt.engine.begin() as conn:
        row, _ = upsert_recipient(conn, external_id, rt.address(email), {}, now)
        record_consent(conn, row, "newsletter", True, "api", "v1", now - timedelta(days=1), now)
    return int(row.id), str(row.email_hash)


def test_a_profiles_consent_covers_only_the_address_on_the_profile(db_url: str) -> None:
    # Given a person who granted the newsletter at the address on her profile
    rt = unit_runtime(db_url)
    rid, current = _person(rt, f"facts-{uuid.uuid4().hex[:8]}@example.org")
    old = rt.address(f"facts-old-{uuid.uuid4().hex[:8]}@example.org").hash

    def target(key: str, to_hash: str) -> Target:
        return Target(key=key, category=Category.PROMOTION, topic="newsletter",
                      recipient_id=rid, to_hash=to_hash, template="newsletter")

    # When the policy's facts are gathered for a promotion to that address and for one
    # still addressed to another (her address before the profile changed, SPEC 3)
    with rt.engine.connect() as conn:
        states = load_states(conn, [target("here", current), target("gone", old)], rt.clock(),
                             rt.settings.service_alert_window)
    # Then the first carries her consent and the second none at all
    assert [c.topic for c in states["here"].consents] == ["newsletter"]
    assert states["gone"].consents == ()
    # And both still know her account is active
    assert states["here"].account_active and states["gone"].account_active


def test_earlier_sends_count_only_when_accepted_before_and_not_given_up(db_url: str) -> None:
    # Given three registration confirmations to one address: one suppressed long ago, one
    # sent, and the one being decided, accepted last
    rt = unit_runtime(db_url)
    now = rt.clock()
    to_hash = uuid.uuid4().hex * 2
    rows = [message_row(rt, status, now - timedelta(minutes=minutes), to_hash=to_hash)
            for status, minutes in ((S.SUPPRESSED, 30), (S.SENT, 20), (S.SENDING, 10))]
    with rt.engine.begin() as conn:
        insert_messages(conn, rows, now)
    mine = rows[-1]
    # When the worker gathers the facts for the last one
    with rt.engine.connect() as conn:
        states = load_states(conn, [Target(
            key="k", category=Category.REGISTRATION_CONFIRMATION, topic=None,
            recipient_id=None, to_hash=to_hash, template="registration_confirmation",
            message_id=mine["id"], created_at=mine["created_at"])], now,
            rt.settings.service_alert_window)
    # Then only the sent one is a prior send: the suppressed one never went, and the
    # message itself is not its own predecessor
    assert states["k"].prior_sends == (rows[1]["created_at"],)


def test_service_alerts_count_inside_the_window_and_confirmations_for_ever(
    db_url: str,
) -> None:
    # Given sent service alerts and sent registration confirmations to one address, each
    # kind once just inside the service-alert window and once just outside it, plus a
    # sent consent confirmation, which no rule counts
    rt = unit_runtime(db_url)
    now = rt.clock()
    window = rt.settings.service_alert_window
    to_hash = uuid.uuid4().hex * 2
    inside, outside = now - window + timedelta(minutes=1), now - window - timedelta(minutes=1)
    rows = [message_row(rt, S.SENT, when, to_hash=to_hash, category=category.value,
                        template=category.value)
            for category in (Category.SERVICE_ALERT, Category.REGISTRATION_CONFIRMATION)
            for when in (inside, outside)]
    rows.append(message_row(rt, S.SENT, inside, to_hash=to_hash,
                            template="consent_confirmation"))
    with rt.engine.begin() as conn:
        insert_messages(conn, rows, now)

    def target(category: Category) -> Target:
        return Target(key=category.value, category=category, topic=None, recipient_id=None,
                      to_hash=to_hash, template=category.value)

    # When the facts are gathered for one more of each kind
    with rt.engine.connect() as conn:
        states = load_states(conn, [target(Category.SERVICE_ALERT),
                                    target(Category.REGISTRATION_CONFIRMATION)], now, window)
    # Then a service alert counts only the alert inside the window
    assert states["service_alert"].prior_sends == (rows[0]["created_at"],)
    # And a registration confirmation counts both of its kind, however old, and never the
    # consent confirmation
    assert sorted(states["registration_confirmation"].prior_sends) == sorted(
        [rows[2]["created_at"], rows[3]["created_at"]])


def test_a_recipient_gone_from_the_store_has_no_account_and_no_consent(db_url: str) -> None:
    # Given a target naming a profile id that no longer exists (erased)
    rt = unit_runtime(db_url)
    missing = 2_000_000_000
    with rt.engine.connect() as conn:
        assert conn.execute(select(recipients.c.id).where(recipients.c.id == missing)
                            ).first() is None
        states = load_states(conn, [Target(
            key="x", category=Category.PROMOTION, topic="newsletter", recipient_id=missing,
            to_hash="0" * 64, template="newsletter")], rt.clock(),
            rt.settings.service_alert_window)
    # Then the policy sees no account and no consent
    assert not states["x"].account_active and states["x"].consents == ()
