"""Events are written in the transaction of the state change they report (SPEC 13)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from mailer.campaigns import lifecycle
from mailer.events import endpoints
from mailer.events.body import MESSAGE_KEYS
from mailer.events.record import MessageChange, record_message_changes
from mailer.inbound.delivery import InboundDelivery
from mailer.preferences.erasure import erase
from mailer.preferences.self_service import SelfService
from mailer.store.outbox import Outcome, claim, finish, insert_messages
from mailer.store.recipients import recipient_by_id, record_consent, upsert_recipient
from mailer.store.schema import campaigns, outbound_events
from mailer.store.status import MessageStatus as S
from tests.conftest import unique_email
from tests.events.world import about, events_for, registered
from tests.units import message_row, unit_runtime

pytestmark = pytest.mark.db

URL = "https://hooks.example.test/mailer"
LEASE = timedelta(minutes=2)


def test_a_sent_message_writes_one_event_with_every_key(db_url: str) -> None:
    # Given an endpoint for every type, and a message a worker has claimed
    rt = unit_runtime(db_url)
    now = rt.clock()
    row = message_row(rt, S.QUEUED, now, campaign_id=None, to_email="ada@example.org")
    with registered(rt, URL) as endpoint:
        with rt.engine.begin() as conn:
            insert_messages(conn, [row], now)
            claim(conn, [row["id"]], now, LEASE)
        # When the worker records that the relay took it
        with rt.engine.begin() as conn:
            finish(conn, [Outcome(row["id"], S.SENT, smtp_code=250, smtp_response="250 ok")],
                   now)
        # Then exactly one event is waiting for the endpoint, with the SPEC's body
        [event] = about(events_for(rt, endpoint.id), row["id"])
    assert event["id"].startswith("msg_") and event["state"] == "pending"
    body = event["body"]
    assert body["type"] == "message.sent"
    assert tuple(body["data"]) == MESSAGE_KEYS
    assert body["data"] == {
        "message_id": row["id"], "status": "sent", "reason": None,
        "category": "registration_confirmation", "template": "registration_confirmation",
        "to": "ada@example.org", "recipient_external_id": None, "campaign_id": None,
        "smtp_code": 250}


def test_only_the_types_an_endpoint_asked_for_are_written_for_it(db_url: str) -> None:
    # Given one endpoint for failures only and one for everything
    rt = unit_runtime(db_url)
    now = rt.clock()
    deferred = message_row(rt, S.QUEUED, now)
    failed = message_row(rt, S.QUEUED, now)
    with registered(rt, URL, ["message.failed"]) as narrow, registered(rt, URL) as wide:
        with rt.engine.begin() as conn:
            insert_messages(conn, [deferred, failed], now)
            claim(conn, [deferred["id"], failed["id"]], now, LEASE)
            # When one is deferred and one fails
            finish(conn, [
                Outcome(deferred["id"], S.DEFERRED, reason="relay_error", smtp_code=454,
                        next_attempt_at=now + timedelta(minutes=1)),
                Outcome(failed["id"], S.FAILED, reason="smtp_rejected", smtp_code=550),
            ], now)
        narrow_events = events_for(rt, narrow.id)
        wide_events = events_for(rt, wide.id)
    # Then the narrow endpoint has the failure only, the wide one both
    assert [e["body"]["type"] for e in about(narrow_events, failed["id"])] == ["message.failed"]
    assert about(narrow_events, deferred["id"]) == []
    [d] = about(wide_events, deferred["id"])
    assert (d["body"]["type"], d["body"]["data"]["reason"], d["body"]["data"]["smtp_code"]) \
        == ("message.deferred", "relay_error", 454)
    # And both endpoints hear of the failure under one event id (one event, two deliveries)
    assert about(wide_events, failed["id"])[0]["id"] == about(narrow_events, failed["id"])[0]["id"]


def test_a_lost_compare_and_set_or_a_rollback_writes_no_event(db_url: str) -> None:
    rt = unit_runtime(db_url)
    now = rt.clock()
    already = message_row(rt, S.SENT, now - timedelta(seconds=5))
    rolled = message_row(rt, S.QUEUED, now)
    with registered(rt, URL) as endpoint:
        with rt.engine.begin() as conn:
            insert_messages(conn, [already, rolled], now - timedelta(seconds=5))
            claim(conn, [rolled["id"]], now, LEASE)
        before = about(events_for(rt, endpoint.id), already["id"])
        # When a redelivered chunk records "sent" again for a row that is no longer sending
        with rt.engine.begin() as conn:
            assert finish(conn, [Outcome(already["id"], S.SENT, smtp_code=250)], now) == 0
        # And a transaction that recorded "sent" rolls back
        with pytest.raises(RuntimeError), rt.engine.begin() as conn:
            finish(conn, [Outcome(rolled["id"], S.SENT, smtp_code=250)], now)
            raise RuntimeError("killed before commit")
        found = events_for(rt, endpoint.id)
    # Then neither wrote an event: the event exists exactly when the change does
    assert about(found, already["id"]) == before and about(found, rolled["id"]) == []


def test_a_message_suppressed_at_acceptance_is_announced(db_url: str) -> None:
    # Given an endpoint for suppressions
    rt = unit_runtime(db_url)
    now = rt.clock()
    row = message_row(rt, S.SUPPRESSED, now, reason="no_account", category="service_alert",
                      template="service_alert")
    with registered(rt, URL, ["message.suppressed"]) as endpoint:
        # When acceptance writes a suppressed row
        with rt.engine.begin() as conn:
            insert_messages(conn, [row], now)
        [event] = about(events_for(rt, endpoint.id), row["id"])
    # Then its event says why
    assert event["body"]["type"] == "message.suppressed"
    assert (event["body"]["data"]["status"], event["body"]["data"]["reason"]) \
        == ("suppressed", "no_account")
    assert event["body"]["data"]["smtp_code"] is None


def test_nothing_is_written_without_a_subscriber_or_for_a_deleted_endpoint(
    db_url: str,
) -> None:
    rt = unit_runtime(db_url)
    now = rt.clock()
    row = message_row(rt, S.SUPPRESSED, now, reason="no_account")
    with registered(rt, URL, ["message.sent"]) as sent_only, registered(rt, URL) as gone:
        with rt.engine.begin() as conn:
            endpoints.delete(conn, gone.id, now)
        with rt.engine.begin() as conn:
            insert_messages(conn, [row], now)
        assert about(events_for(rt, sent_only.id), row["id"]) == []
        assert about(events_for(rt, gone.id), row["id"]) == []
    with rt.engine.connect() as conn:
        stored = conn.execute(select(outbound_events.c.id)
                              .where(outbound_events.c.message_id == row["id"])).all()
    assert stored == []


def test_a_change_named_for_another_moment_is_not_announced(db_url: str) -> None:
    # A change record names the moment of its transaction; a row stamped otherwise was
    # changed by someone else, whose event it is.
    rt = unit_runtime(db_url)
    now = rt.clock()
    row = message_row(rt, S.FAILED, now, reason="expired")
    with registered(rt, URL) as endpoint:
        with rt.engine.begin() as conn:
            insert_messages(conn, [row], now)  # announces the failure once
            written = record_message_changes(
                conn, [MessageChange(row["id"], S.FAILED, "expired")], now + timedelta(1))
        assert written == 0
        assert len(about(events_for(rt, endpoint.id), row["id"])) == 1


def _profile(rt, prefix: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    address = rt.address(unique_email(prefix))
    now = rt.clock()
    with rt.engine.begin() as conn:
        row, _ = upsert_recipient(conn, f"ext-{prefix}-{address.hash[:10]}", address,
                                  {"name": "Ada"}, now)
        record_consent(conn, row, "newsletter", True, "signup_form", "1", now, now,
                       {"form": "https://example.test/signup"})
    return int(row.id), str(row.external_id)


def test_a_persons_own_unsubscribe_is_announced_and_a_repeat_is_not(db_url: str) -> None:
    # Given a subscribed person and an endpoint for unsubscribes
    rt = unit_runtime(db_url)
    rid, external_id = _profile(rt, "unsub")
    with registered(rt, URL, ["recipient.unsubscribed"]) as endpoint:
        # When they unsubscribe by link, and then once more
        assert SelfService(rt).unsubscribe(rid, "newsletter", "one_click")
        assert not SelfService(rt).unsubscribe(rid, "newsletter", "one_click")
        found = events_for(rt, endpoint.id)
    # Then one event, naming them, the topic and the way they did it
    [event] = [e for e in found
               if e["body"]["data"]["recipient_external_id"] == external_id]
    assert event["body"]["type"] == "recipient.unsubscribed"
    data = event["body"]["data"]
    assert (data["topics"], data["all_marketing"], data["source"]) \
        == (["newsletter"], False, "one_click")
    assert data["email"].startswith("unsub-")


def test_an_unsubscribe_by_mailto_is_announced(db_url: str) -> None:
    # Given the inbound domain, a subscribed person, and an endpoint
    rt = unit_runtime(db_url, MAILER_INBOUND_DOMAIN="in.example.test")
    rid, external_id = _profile(rt, "mailto")
    inbound = InboundDelivery(rt)
    assert inbound.addresses is not None
    target = inbound.target(inbound.addresses.unsubscribe_address(rid, "newsletter"))
    assert target is not None
    with registered(rt, URL, ["recipient.unsubscribed"]) as endpoint:
        # When mail reaches unsubscribe+TOKEN@ (RFC 8058 section 3.2)
        inbound.deliver(target, b"Subject: unsubscribe\r\n\r\n")
        found = [e for e in events_for(rt, endpoint.id)
                 if e["body"]["data"]["recipient_external_id"] == external_id]
    # Then the service hears of it, with source mailto
    assert [(e["body"]["data"]["topics"], e["body"]["data"]["source"]) for e in found] \
        == [(["newsletter"], "mailto")]


def test_unsubscribe_from_everything_and_preference_centre_revokes(db_url: str) -> None:
    rt = unit_runtime(db_url)
    everything, ext_all = _profile(rt, "all")
    with registered(rt, URL, ["recipient.unsubscribed"]) as endpoint:
        SelfService(rt).unsubscribe_all(everything, "preference_center")
        found = [e["body"]["data"] for e in events_for(rt, endpoint.id)
                 if e["body"]["data"]["recipient_external_id"] == ext_all]
    assert len(found) == 1 and found[0]["all_marketing"] is True
    assert "newsletter" in found[0]["topics"]


def test_a_completed_campaign_is_announced_with_its_counts(db_url: str) -> None:
    # Given a running campaign whose fan-out is done and whose one message was sent
    rt = unit_runtime(db_url)
    now = rt.clock()
    with rt.engine.begin() as conn:
        campaign_id = lifecycle.create(conn, lifecycle.NewCampaign(
            name="Spring", template="newsletter", topic="newsletter", send_at=now), None, now)
        conn.execute(update(campaigns).where(campaigns.c.id == campaign_id).values(
            status="running", started_at=now, fanned_out_at=now, audience_count=1))
    row = message_row(rt, S.SENT, now, campaign_id=campaign_id, category="promotion",
                      template="newsletter", topic="newsletter")
    with registered(rt, URL, ["campaign.completed"]) as endpoint:
        with rt.engine.begin() as conn:
            insert_messages(conn, [row], now)
            # When the scheduler completes it
            assert campaign_id in lifecycle.complete_finished(conn, now)
        [event] = [e for e in events_for(rt, endpoint.id)
                   if e["body"]["data"]["campaign_id"] == campaign_id]
    data = event["body"]["data"]
    assert (event["body"]["type"], data["name"], data["status"]) \
        == ("campaign.completed", "Spring", "completed")
    assert data["counts"]["sent"] == 1 and data["counts"]["audience"] == 1


def test_erasure_leaves_no_address_in_stored_events(db_url: str) -> None:
    # Given a person with a suppressed message announced to an endpoint
    rt = unit_runtime(db_url)
    rid, external_id = _profile(rt, "erase")
    now = rt.clock()
    with rt.engine.connect() as conn:
        person = recipient_by_id(conn, rid)
    assert person is not None
    row = message_row(rt, S.SUPPRESSED, now, reason="no_consent", recipient_id=rid,
                      to_email=person.email, to_hash=person.email_hash)
    with registered(rt, URL) as endpoint:
        with rt.engine.begin() as conn:
            insert_messages(conn, [row], now)
        assert about(events_for(rt, endpoint.id), row["id"])[0]["body"]["data"]["to"] \
            == person.email
        # When they are erased
        erase(rt, external_id)
        [event] = about(events_for(rt, endpoint.id), row["id"])
    # Then the event still goes out, but names nobody
    assert event["body"]["data"]["to"] is None
    assert event["body"]["data"]["recipient_external_id"] is None
    with rt.engine.connect() as conn:
        bodies = [b for (b,) in conn.execute(select(outbound_events.c.body))]
    assert not any(person.email in b for b in bodies)
