"""Delivering event webhooks to a real HTTP receiver on loopback (SPEC 13)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from mailer.client import verify_webhook
from mailer.events import endpoints
from mailer.events.body import EventType, message_data
from mailer.events.delivery import Deliverer
from mailer.events.metrics import deliveries_total
from mailer.events.record import NewEvent, record
from mailer.runtime import Runtime
from mailer.store.schema import outbound_deliveries, outbound_events
from mailer.times import utcnow
from tests.events.receiver import Answer, Receiver, running_receiver, tls_contexts
from tests.events.world import Endpoint, events_for, registered
from tests.services import free_port
from tests.units import unit_runtime

pytestmark = pytest.mark.db

ALLOW = {"MAILER_WEBHOOK_ALLOW_PRIVATE": "true", "MAILER_WEBHOOK_RETRY_BASE": "1s"}


@dataclass
class Clock:
    """A clock the test moves by hand."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


def runtime(db_url: str, **extra: str) -> tuple[Runtime, Clock]:
    rt = unit_runtime(db_url, **extra)
    clock = Clock(utcnow())
    rt.clock = clock
    return rt, clock


def announce(rt: Runtime, at: datetime | None = None) -> str:
    """Write one message.sent event; return its message id."""
    message_id = uuid.uuid4().hex
    data = message_data(message_id=message_id, status="sent", reason=None,
                        category="service_alert", template="service_alert",
                        to="ada@example.org", recipient_external_id="ext-ada",
                        campaign_id=None, smtp_code=250)
    with rt.engine.begin() as conn:
        record(conn, [NewEvent(EventType.MESSAGE_SENT, data, message_id=message_id)],
               at or rt.clock())
    return message_id


def endpoint_view(rt: Runtime, endpoint: Endpoint) -> dict[str, Any]:
    with rt.engine.connect() as conn:
        return endpoints.view(endpoints.get(conn, endpoint.id))


def verified(endpoint: Endpoint, hits: Sequence[Any], clock: Clock) -> list[dict[str, Any]]:
    """Each hit's body, after checking its signature as a receiver would."""
    return [verify_webhook(endpoint.secret, h.headers, h.body, now=clock().timestamp())
            for h in hits]


def counts(rt: Runtime) -> dict[str, int]:
    with rt.engine.connect() as conn:
        return deliveries_total(conn)


def test_an_event_is_posted_signed_to_the_endpoint(db_url: str, receiver: Receiver) -> None:
    # Given an endpoint and one event waiting for it
    rt, clock = runtime(db_url, **ALLOW)
    before = counts(rt)
    with registered(rt, receiver.url("/hooks")) as endpoint:
        message_id = announce(rt)
        # When the deliverer runs
        report = Deliverer(rt).run_once()
        [event] = [e for e in events_for(rt, endpoint.id)
                   if e["body"]["data"]["message_id"] == message_id]
    # Then the receiver got it once, signed, under the event's id
    [hit] = receiver.hits("/hooks")
    [body] = verified(endpoint, [hit], clock)
    assert body["type"] == "message.sent" and body["data"]["message_id"] == message_id
    assert hit.headers["webhook-id"] == event["id"]
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert abs(int(hit.headers["webhook-timestamp"]) - clock().timestamp()) < 2
    # And the delivery is recorded, and counted for /metrics
    assert (event["state"], event["attempts"]) == ("delivered", 1)
    assert report.results == {"delivered": 1}
    assert counts(rt)["delivered"] == before["delivered"] + 1


def test_a_failed_delivery_is_retried_with_the_same_id_and_then_not_again(
    db_url: str, receiver: Receiver,
) -> None:
    # Given a receiver that answers 500 once, then 200
    rt, clock = runtime(db_url, **ALLOW)
    receiver.plan("/flaky", Answer(500))
    with registered(rt, receiver.url("/flaky")) as endpoint:
        announce(rt)
        deliverer = Deliverer(rt)
        # When the first attempt fails
        deliverer.run_once()
        failing = endpoint_view(rt, endpoint)
        [pending] = events_for(rt, endpoint.id)
        # Then the endpoint shows it, and backs off: an immediate pass sends nothing
        assert failing["failing_since"] is not None and failing["last_error"] == "HTTP 500"
        assert (pending["state"], pending["attempts"]) == ("pending", 1)
        assert deliverer.run_once().claimed == 0
        assert len(receiver.hits("/flaky")) == 1
        # When the backoff has passed (base 1 s, +-20 %)
        clock.now += timedelta(seconds=2)
        deliverer.run_once()
        # Then the same event came again, under the same webhook-id, and was taken
        first, second = receiver.hits("/flaky")
        assert first.headers["webhook-id"] == second.headers["webhook-id"] == pending["id"]
        assert first.body == second.body
        verified(endpoint, [second], clock)
        [done] = events_for(rt, endpoint.id)
        assert (done["state"], done["attempts"]) == ("delivered", 2)
        recovered = endpoint_view(rt, endpoint)
        assert recovered["failing_since"] is None
        assert recovered["last_error"] == "HTTP 500"  # kept: the last error there was
        # And nothing more is sent, however often the deliverer runs
        clock.now += timedelta(hours=1)
        for _ in range(3):
            deliverer.run_once()
    assert len(receiver.hits("/flaky")) == 2


def test_one_endpoints_line_stops_at_its_first_failure(db_url: str,
                                                       receiver: Receiver) -> None:
    # Given two events for a receiver that fails the first request
    rt, _ = runtime(db_url, **ALLOW)
    receiver.plan("/line", Answer(503))
    with registered(rt, receiver.url("/line")) as endpoint:
        first, second = announce(rt), announce(rt)
        # When the deliverer runs
        Deliverer(rt).run_once()
        found = {e["body"]["data"]["message_id"]: e for e in events_for(rt, endpoint.id)}
    # Then only the first was tried: a failing receiver is probed once, not per event
    assert len(receiver.hits("/line")) == 1
    assert (found[first]["attempts"], found[second]["attempts"]) == (1, 0)


def test_a_redirect_is_not_followed(db_url: str, receiver: Receiver) -> None:
    # Given a receiver that redirects elsewhere
    rt, _ = runtime(db_url, **ALLOW)
    receiver.plan("/moved", Answer(302, location=receiver.url("/elsewhere")))
    with registered(rt, receiver.url("/moved")) as endpoint:
        announce(rt)
        Deliverer(rt).run_once()
        view = endpoint_view(rt, endpoint)
        [event] = events_for(rt, endpoint.id)
    # Then the other URL never got a request, and the attempt failed
    assert len(receiver.hits("/moved")) == 1
    assert receiver.hits("/elsewhere") == []
    assert view["last_error"] == "HTTP 302: redirects are not followed"
    assert event["state"] == "pending" and event["last_error"] == view["last_error"]


def test_a_slow_receiver_times_out(db_url: str, receiver: Receiver) -> None:
    # Given a receiver that takes 3 s, and a deliverer with a 0.5 s limit
    rt, _ = runtime(db_url, **ALLOW)
    receiver.plan("/slow", Answer(200, delay=3))
    with registered(rt, receiver.url("/slow")) as endpoint:
        announce(rt)
        started = time.monotonic()
        report = Deliverer(rt, timeout=0.5).run_once()
        elapsed = time.monotonic() - started
        view = endpoint_view(rt, endpoint)
    # Then the attempt is a failure, given up on at the limit, not when the answer came
    assert report.results == {"failed": 1}
    assert view["last_error"] == "no answer within 0.5 s"
    assert elapsed < 2.5


def test_a_refused_connection_is_a_failure(db_url: str) -> None:
    rt, _ = runtime(db_url, **ALLOW)
    with registered(rt, f"http://127.0.0.1:{free_port()}/nobody") as endpoint:
        announce(rt)
        report = Deliverer(rt).run_once()
        view = endpoint_view(rt, endpoint)
    assert report.results == {"failed": 1}
    assert view["last_error"] == "connection refused or unreachable"


def test_a_private_target_is_refused_again_at_delivery(db_url: str,
                                                      receiver: Receiver) -> None:
    # Given an endpoint on loopback in the store (as if registered while allowed, or
    # before its name was re-pointed), and a deliverer without the allow flag
    rt, _ = runtime(db_url)
    before = counts(rt)
    with registered(rt, receiver.url("/inside")) as endpoint:
        announce(rt)
        # When it runs
        report = Deliverer(rt).run_once()
        view = endpoint_view(rt, endpoint)
        [event] = events_for(rt, endpoint.id)
    # Then no request was made, and the endpoint says why
    assert receiver.hits() == []
    assert report.results == {"refused": 1}
    assert "loopback" in view["last_error"] and event["state"] == "pending"
    assert counts(rt)["refused"] == before["refused"] + 1


def test_a_name_is_connected_to_at_the_address_that_was_checked(
    db_url: str, receiver: Receiver,
) -> None:
    # Given a host name and a resolver that says where it is (as DNS would)
    seen: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        seen.append(host)
        return ["127.0.0.1"]

    rt, clock = runtime(db_url, **ALLOW)
    url = f"http://hooks.example.test:{receiver.port}/named"
    with registered(rt, url) as endpoint:
        announce(rt)
        # When the deliverer runs
        Deliverer(rt, resolve=resolve).run_once()
    # Then it resolved the name once and connected to that address, sending the name as
    # the Host, so the address checked is the address used (no second lookup to rebind)
    [hit] = receiver.hits("/named")
    assert seen == ["hooks.example.test"]
    assert hit.headers["host"] == f"hooks.example.test:{receiver.port}"
    verified(endpoint, [hit], clock)


def test_https_is_checked_against_the_urls_host_not_the_address(db_url: str) -> None:
    # Given an HTTPS receiver whose certificate names hooks.example.test and no address
    server_tls, client_tls = tls_contexts("hooks.example.test")

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    rt, clock = runtime(db_url, **ALLOW)
    transport = httpx.AsyncHTTPTransport(verify=client_tls)
    with running_receiver(tls=server_tls) as receiver:
        good = receiver.url("/tls", host="hooks.example.test")
        bad = receiver.url("/tls-other", host="other.example.test")
        with registered(rt, good, ["message.sent"]) as endpoint, \
                registered(rt, bad, ["message.sent"]) as impostor:
            announce(rt)
            # When the deliverer connects to 127.0.0.1 for both names
            Deliverer(rt, resolve=resolve, transport=transport).run_once()
            impostor_view = endpoint_view(rt, impostor)
        # Then the certificate is checked against the URL's host: the right name gets
        # its event, signed; the other name fails the handshake and gets nothing
        [hit] = receiver.hits("/tls")
        verified(endpoint, [hit], clock)
        assert hit.headers["host"] == f"hooks.example.test:{receiver.port}"
        assert receiver.hits("/tls-other") == []
        assert impostor_view["last_error"].startswith("TLS handshake failed")


def test_a_delivery_failing_after_24_hours_is_given_up(db_url: str,
                                                       receiver: Receiver) -> None:
    # Given an event written 25 hours ago whose receiver still fails
    rt, clock = runtime(db_url, **ALLOW)
    receiver.plan("/down", *[Answer(500)] * 3)
    before = counts(rt)
    with registered(rt, receiver.url("/down")) as endpoint:
        announce(rt, at=clock() - timedelta(hours=25))
        deliverer = Deliverer(rt)
        # When it is attempted and fails
        deliverer.run_once()
        [event] = events_for(rt, endpoint.id)
        # Then it is dead, counted so, and never tried again
        assert (event["state"], event["attempts"]) == ("dead", 1)
        clock.now += timedelta(hours=3)
        deliverer.run_once()
    assert len(receiver.hits("/down")) == 1
    assert counts(rt)["dead"] == before["dead"] + 1


def test_a_delivery_claimed_by_a_killed_scheduler_goes_out_after_its_lease(
    db_url: str, receiver: Receiver,
) -> None:
    # Given a delivery claimed by a scheduler that was then killed (never recorded)
    rt, clock = runtime(db_url, **ALLOW)
    with registered(rt, receiver.url("/lease")) as endpoint:
        announce(rt)
        killed = Deliverer(rt)
        assert len(killed.claim(clock())) == 1
        # When another scheduler runs before the lease is over, Then it leaves it alone
        other = Deliverer(rt)
        assert other.run_once().claimed == 0
        # When the lease has run out, Then the other one delivers it
        clock.now += killed.lease + timedelta(seconds=1)
        assert other.run_once().results == {"delivered": 1}
        [event] = events_for(rt, endpoint.id)
    [hit] = receiver.hits("/lease")
    assert hit.headers["webhook-id"] == event["id"]


def test_a_deleted_endpoint_gets_nothing_more(db_url: str, receiver: Receiver) -> None:
    rt, _ = runtime(db_url, **ALLOW)
    with registered(rt, receiver.url("/bye")) as endpoint:
        announce(rt)
        with rt.engine.begin() as conn:
            assert endpoints.delete(conn, endpoint.id, rt.clock()) == 1
        Deliverer(rt).run_once()
        [event] = events_for(rt, endpoint.id)
    assert receiver.hits() == [] and event["state"] == "cancelled"


def test_finished_deliveries_are_pruned_after_a_week(db_url: str, receiver: Receiver) -> None:
    # Given a delivered event from eight days ago
    rt, clock = runtime(db_url, **ALLOW)
    with registered(rt, receiver.url("/old")) as endpoint:
        message_id = announce(rt, at=clock() - timedelta(days=8))
        with rt.engine.begin() as conn:
            conn.execute(update(outbound_deliveries)
                         .where(outbound_deliveries.c.endpoint_id == endpoint.id)
                         .values(state="delivered"))
        # When the deliverer prunes
        Deliverer(rt).prune(clock())
        # Then the delivery and the event (and the address in it) are gone
        assert events_for(rt, endpoint.id) == []
    with rt.engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(outbound_events)
                            .where(outbound_events.c.message_id == message_id)).scalar_one()
    assert left == 0
