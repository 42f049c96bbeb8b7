"""``mailer.client``: the sync and async clients against the real API, and verify_webhook.

The clients talk HTTP to the real app under a real uvicorn on a loopback port, backed by
the test database; faults (a lost answer, a refused connection, a 503) are injected by
wrapping httpx's own transports, so the server really processes what it receives.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from mailer.client import (
    ApiError,
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    NotFoundError,
    PermissionDenied,
    ServerError,
    TransportError,
    ValidationError,
    WebhookVerificationError,
    verify_webhook,
)
from mailer.store.schema import messages
from tests.conftest import serving, unique_email
from tests.services import free_port

CONFIRM = {"name": "Ada", "confirm_url": "https://example.test/confirm/abc"}
#: Retries in tests wait milliseconds, not seconds.
FAST = 0.01


@pytest.fixture(scope="module")
def api_url(runtime: Any) -> Iterator[str]:
    """The real app under a real uvicorn on a free loopback port, stopped afterwards."""
    with serving(runtime) as url:
        yield url


def rows_to(runtime: Any, address: str) -> list[str]:
    """Ids of the message rows addressed to ``address``."""
    with runtime.engine.connect() as conn:
        return list(conn.execute(select(messages.c.id).where(messages.c.to_email == address))
                    .scalars())


def message_count(runtime: Any) -> int:
    """How many message rows exist."""
    with runtime.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(messages)).scalar_one())


class LoseFirstAnswer(httpx.BaseTransport):
    """Forwards every request to the server, but loses the first answer after it arrived."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.bodies: list[dict[str, Any]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.read()))
        response = self.inner.handle_request(request)
        if len(self.bodies) == 1:
            response.read()  # the server has answered: the message exists
            response.close()
            raise httpx.ReadTimeout("answer lost on the way back", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


class AsyncLoseFirstAnswer(httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`LoseFirstAnswer`."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(await request.aread()))
        response = await self.inner.handle_async_request(request)
        if len(self.bodies) == 1:
            await response.aread()
            await response.aclose()
            raise httpx.ReadTimeout("answer lost on the way back", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Counting(httpx.BaseTransport):
    """Counts attempts; answers the first ``canned`` ones itself, then forwards."""

    def __init__(self, canned: list[httpx.Response] | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.canned = list(canned or [])
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.canned:
            return self.canned.pop(0)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


# --- the sync client against the real API -------------------------------------------------


@pytest.mark.db
def test_send_then_get_message(api_url: str, keys: dict[str, str], runtime: Any) -> None:
    # Given a client with a transactional key
    address = unique_email("client")
    with Client(api_url, keys["transactional"]) as mailer:
        # When it sends a registration confirmation to a recipient object
        accepted = mailer.send("registration_confirmation",
                               {"email": address, "name": "Ada Lovelace",
                                "external_id": f"ext-{address[:12]}"}, CONFIRM)
        # Then the 202 body comes back as a dict, and one row exists
        assert accepted["status"] == "queued"
        assert accepted["category"] == "registration_confirmation"
        assert rows_to(runtime, address) == [accepted["id"]]
        # And get_message reports it
        shown = mailer.get_message(accepted["id"])
    assert shown["id"] == accepted["id"]
    assert shown["template"] == "registration_confirmation"
    assert shown["status"] in ("queued", "sending", "sent")  # a session worker may run
    assert isinstance(shown["events"], list)


@pytest.mark.db
def test_send_at_datetime_schedules(api_url: str, keys: dict[str, str]) -> None:
    # Given a time a day from now, as an aware datetime
    later = datetime.now(UTC) + timedelta(days=1)
    with Client(api_url, keys["transactional"]) as mailer:
        # When a message is sent for then
        accepted = mailer.send("registration_confirmation", unique_email("later"), CONFIRM,
                               send_at=later)
        # Then it is scheduled, for that instant
        assert accepted["status"] == "scheduled"
        shown = mailer.get_message(accepted["id"])
    assert abs(datetime.fromisoformat(shown["send_at"]) - later) < timedelta(seconds=1)


@pytest.mark.db
def test_send_batch_one_good_one_bad(api_url: str, keys: dict[str, str],
                                     runtime: Any) -> None:
    # Given one valid message and one with a bad address
    good = unique_email("batch")
    batch = [
        {"template": "registration_confirmation", "to": good, "data": CONFIRM},
        {"template": "registration_confirmation", "to": "not-an-address", "data": CONFIRM},
    ]
    with Client(api_url, keys["transactional"]) as mailer:
        # When they are sent as a batch
        results = mailer.send_batch(batch)["results"]
    # Then the results come back in input order, the bad one as an inline error
    assert results[0]["status"] == "queued"
    assert rows_to(runtime, good) == [results[0]["id"]]
    assert results[1]["error"]["code"] == "invalid_address"
    # And the caller's dicts were not changed by the automatic idempotency keys
    assert "idempotency_key" not in batch[0]


@pytest.mark.db
def test_422_raises_validation_error_with_the_spec_code(
    api_url: str, keys: dict[str, str], runtime: Any
) -> None:
    # Given a registration confirmation without its confirm_url
    before = message_count(runtime)
    with Client(api_url, keys["transactional"]) as mailer, \
            pytest.raises(ValidationError) as caught:
        # When it is sent
        mailer.send("registration_confirmation", unique_email(), {"name": "Ada"})
    # Then the SPEC 7 error body is on the exception, and nothing was written
    assert caught.value.status == 422
    assert caught.value.code == "missing_variable"
    assert caught.value.message
    assert message_count(runtime) == before


@pytest.mark.db
def test_bad_key_is_authentication_error(api_url: str) -> None:
    # Given a key the API never issued
    with Client(api_url, "mk_not-a-real-key") as mailer, \
            pytest.raises(AuthenticationError) as caught:
        # When it sends
        mailer.send("registration_confirmation", unique_email(), CONFIRM)
    # Then it is a 401 with the SPEC code
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")


@pytest.mark.db
def test_missing_scope_is_permission_denied(api_url: str, keys: dict[str, str]) -> None:
    # Given a transactional key, When it sends a legal notice
    with Client(api_url, keys["transactional"]) as mailer, \
            pytest.raises(PermissionDenied) as caught:
        mailer.send("legal_notice", unique_email(), {"name": "A"})
    # Then 403, which is also an AuthenticationError for callers that catch that
    assert isinstance(caught.value, AuthenticationError)
    assert (caught.value.status, caught.value.code) == (403, "forbidden")


@pytest.mark.db
def test_unknown_message_is_not_found(api_url: str, keys: dict[str, str]) -> None:
    with Client(api_url, keys["transactional"]) as mailer, \
            pytest.raises(NotFoundError) as caught:
        mailer.get_message("0" * 32)
    assert caught.value.status == 404


@pytest.mark.db
def test_explicit_key_replays_and_conflicts(api_url: str, keys: dict[str, str],
                                            runtime: Any) -> None:
    # Given a send with the caller's own idempotency key
    address = unique_email("idem")
    with Client(api_url, keys["transactional"]) as mailer:
        first = mailer.send("registration_confirmation", address, CONFIRM,
                            idempotency_key="order-42")
        # When the same send is repeated, Then the first answer comes back
        assert mailer.send("registration_confirmation", address, CONFIRM,
                           idempotency_key="order-42")["id"] == first["id"]
        # And the same key with another body is a 409
        with pytest.raises(ConflictError) as caught:
            mailer.send("registration_confirmation", address, {**CONFIRM, "name": "Eve"},
                        idempotency_key="order-42")
    assert caught.value.code == "idempotency_conflict"
    assert rows_to(runtime, address) == [first["id"]]


@pytest.mark.db
def test_automatic_key_survives_a_lost_answer(api_url: str, keys: dict[str, str],
                                              runtime: Any) -> None:
    # Given a network that loses the server's first answer (after the server acted on it)
    address = unique_email("lost")
    lossy = LoseFirstAnswer()
    with Client(api_url, keys["transactional"], transport=lossy, backoff=FAST) as mailer:
        # When the caller sends without an idempotency key
        accepted = mailer.send("registration_confirmation", address, CONFIRM)
    # Then the client retried once with the same generated key
    assert len(lossy.bodies) == 2
    assert lossy.bodies[0]["idempotency_key"] == lossy.bodies[1]["idempotency_key"]
    assert lossy.bodies[0]["idempotency_key"]
    # And exactly one message exists, the one the retry reported
    assert rows_to(runtime, address) == [accepted["id"]]


@pytest.mark.db
def test_each_logical_send_gets_its_own_key(api_url: str, keys: dict[str, str],
                                            runtime: Any) -> None:
    # Given two separate sends of the same body without keys
    address = unique_email("twice")
    with Client(api_url, keys["transactional"]) as mailer:
        first = mailer.send("registration_confirmation", address, CONFIRM)
        second = mailer.send("registration_confirmation", address, CONFIRM)
    # Then they are two sends, not a replay (the API may suppress the repeat, SPEC 2)
    assert first["id"] != second["id"]
    assert sorted(rows_to(runtime, address)) == sorted([first["id"], second["id"]])


@pytest.mark.db
def test_batch_keys_survive_a_lost_answer(api_url: str, keys: dict[str, str],
                                          runtime: Any) -> None:
    # Given a lost first answer to a batch of two
    a, b = unique_email("ba"), unique_email("bb")
    lossy = LoseFirstAnswer()
    with Client(api_url, keys["transactional"], transport=lossy, backoff=FAST) as mailer:
        results = mailer.send_batch([
            {"template": "registration_confirmation", "to": a, "data": CONFIRM},
            {"template": "registration_confirmation", "to": b, "data": CONFIRM},
        ])["results"]
    # Then the retry carried the same per-item keys, and each address has one message
    assert lossy.bodies[0] == lossy.bodies[1]
    assert rows_to(runtime, a) == [results[0]["id"]]
    assert rows_to(runtime, b) == [results[1]["id"]]


@pytest.mark.db
def test_503_is_retried_then_succeeds(api_url: str, keys: dict[str, str]) -> None:
    # Given a gateway that answers 503 once before passing requests on
    gateway = Counting([httpx.Response(503, json={"error": {"code": "unavailable",
                                                            "message": "m", "details": None}})])
    with Client(api_url, keys["transactional"], transport=gateway, backoff=FAST) as mailer:
        accepted = mailer.send("registration_confirmation", unique_email("gw"), CONFIRM)
    # Then the second attempt went through
    assert gateway.calls == 2
    assert accepted["status"] == "queued"


# --- retry policy without the API -----------------------------------------------------------


@pytest.mark.parametrize("status", [400, 409, 422, 429, 500])
def test_other_statuses_are_not_retried(status: int) -> None:
    # Given a server that always answers ``status``
    gateway = Counting([httpx.Response(status, json={"error": {
        "code": "x", "message": "m", "details": {"k": 1}}}) for _ in range(5)])
    with Client("http://127.0.0.1:9", "key", transport=gateway, backoff=FAST) as mailer, \
            pytest.raises(ApiError) as caught:
        mailer.send("registration_confirmation", "a@example.org", CONFIRM)
    # Then one attempt only, and the error carries the body
    assert gateway.calls == 1
    assert (caught.value.status, caught.value.code, caught.value.details) == (status, "x",
                                                                            {"k": 1})


def test_persistent_502_gives_up_after_the_retry_budget() -> None:
    gateway = Counting([httpx.Response(502, text="<html>bad gateway</html>")
                        for _ in range(10)])
    with Client("http://127.0.0.1:9", "key", transport=gateway, max_retries=2,
                backoff=FAST) as mailer, pytest.raises(ServerError) as caught:
        mailer.get_message("abc")
    assert gateway.calls == 3
    assert (caught.value.status, caught.value.code) == (502, "http_502")


def test_refused_connection_is_retried_then_transport_error() -> None:
    # Given a loopback port nobody listens on
    transport = Counting()
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with Client(url, "key", transport=transport, max_retries=2, backoff=FAST) as mailer, \
            pytest.raises(TransportError) as caught:
        mailer.send("registration_confirmation", "a@example.org", CONFIRM,
                    idempotency_key="k-1")
    # Then three attempts were made, quickly, and the key is handed back for a later retry
    assert transport.calls == 3
    assert time.monotonic() - started < 5
    assert caught.value.idempotency_key == "k-1"
    assert isinstance(caught.value, ConnectionError)


def test_optional_fields_go_on_the_wire_only_when_given() -> None:
    # Given a server stand-in that records the bodies it receives
    seen: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.read()))
        return httpx.Response(202, json={"id": "m", "status": "queued", "category": "c"})

    with Client("http://127.0.0.1:9", "key", transport=httpx.MockTransport(answer)) as mailer:
        # When one send names every option and another none
        mailer.send("service_alert", {"email": "a@example.org", "name": "A"}, {"x": 1},
                    topic="news", idempotency_key="k", send_at="2030-01-01T09:00:00Z",
                    locale="de-AT")
        mailer.send("service_alert", "b@example.org")
    # Then the first carries them as SPEC 7 and 14 name them, the second only the key
    assert seen[0] == {"template": "service_alert", "to": {"email": "a@example.org", "name": "A"},
                       "data": {"x": 1}, "topic": "news", "idempotency_key": "k",
                       "send_at": "2030-01-01T09:00:00Z", "locale": "de-AT"}
    assert set(seen[1]) == {"template", "to", "idempotency_key"}


# --- the async client -----------------------------------------------------------------------


@pytest.mark.db
def test_async_client_sends_reads_and_raises(api_url: str, keys: dict[str, str],
                                             runtime: Any) -> None:
    address, good = unique_email("async"), unique_email("async-batch")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with AsyncClient(api_url, keys["transactional"]) as mailer:
            accepted = await mailer.send("registration_confirmation", address, CONFIRM)
            shown = await mailer.get_message(accepted["id"])
            batch = await mailer.send_batch([
                {"template": "registration_confirmation", "to": good, "data": CONFIRM},
                {"template": "no_such_template", "to": good, "data": {}},
            ])
            with pytest.raises(ValidationError) as caught:
                await mailer.send("registration_confirmation", "not-an-address", CONFIRM)
            assert caught.value.code == "invalid_address"
        async with AsyncClient(api_url, "mk_wrong") as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.get_message(accepted["id"])
        return accepted, shown, batch

    accepted, shown, batch = asyncio.run(scenario())
    assert shown["id"] == accepted["id"] and accepted["status"] == "queued"
    assert rows_to(runtime, address) == [accepted["id"]]
    assert batch["results"][0]["status"] == "queued"
    assert batch["results"][1]["error"]["code"] == "unknown_template"


@pytest.mark.db
def test_async_automatic_key_survives_a_lost_answer(api_url: str, keys: dict[str, str],
                                                    runtime: Any) -> None:
    address = unique_email("async-lost")
    lossy = AsyncLoseFirstAnswer()

    async def scenario() -> dict[str, Any]:
        async with AsyncClient(api_url, keys["transactional"], transport=lossy,
                               backoff=FAST) as mailer:
            return await mailer.send("registration_confirmation", address, CONFIRM)

    accepted = asyncio.run(scenario())
    assert len(lossy.bodies) == 2
    assert lossy.bodies[0]["idempotency_key"] == lossy.bodies[1]["idempotency_key"]
    assert rows_to(runtime, address) == [accepted["id"]]


# --- verify_webhook (SPEC 13) ---------------------------------------------------------------

KEY = b"\x01\x02 a test signing key \xfe\xff"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
BODY = json.dumps({"type": "message.sent", "timestamp": "2030-01-01T00:00:00Z",
                   "data": {"message_id": "m1", "status": "sent"}}).encode()
NOW = 1_900_000_000


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """A v1 entry computed here, independently of the code under test."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(key: bytes = KEY, body: bytes = BODY, timestamp: int = NOW,
                   msg_id: str = "msg_2abc") -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(key, msg_id, timestamp, body)}


def test_verify_accepts_a_correctly_signed_body() -> None:
    assert verify_webhook(SECRET, signed_headers(), BODY, now=NOW)["data"]["message_id"] == "m1"
    # The body may be given as text, and header names in any case
    headers = {k.title(): v for k, v in signed_headers().items()}
    assert verify_webhook(SECRET, headers, BODY.decode(), now=NOW + 299)["type"] == \
        "message.sent"
    # And through httpx's header type, as a receiver built on httpx would hold them
    assert verify_webhook(SECRET, httpx.Headers(signed_headers()), BODY, now=NOW)


def test_verify_accepts_when_one_of_several_signatures_matches() -> None:
    good = signed_headers()["webhook-signature"]
    other = signature(b"old rotated key", "msg_2abc", NOW, BODY)
    headers = {**signed_headers(), "webhook-signature": f"v1a,xyz {other} {good}"}
    assert verify_webhook(SECRET, headers, BODY, now=NOW)["type"] == "message.sent"


def test_client_method_alias_verifies() -> None:
    with Client("http://127.0.0.1:9", "key") as mailer:
        assert mailer.verify_webhook(SECRET, signed_headers(), BODY, now=NOW)


def flipped(body: bytes) -> bytes:
    return body[:10] + bytes([body[10] ^ 0x01]) + body[11:]


@pytest.mark.parametrize(
    ("secret", "headers", "body", "now"),
    [
        pytest.param(SECRET, signed_headers(), flipped(BODY), NOW, id="bit-flipped body"),
        pytest.param("whsec_" + base64.b64encode(b"another key").decode(), signed_headers(),
                     BODY, NOW, id="wrong secret"),
        pytest.param(SECRET, signed_headers(), BODY, NOW + 301, id="stale timestamp"),
        pytest.param(SECRET, signed_headers(), BODY, NOW - 301, id="future timestamp"),
        pytest.param(SECRET, {**signed_headers(), "webhook-timestamp": str(NOW + 1)}, BODY,
                     NOW, id="timestamp not the signed one"),
        pytest.param(SECRET, {**signed_headers(), "webhook-id": "msg_other"}, BODY, NOW,
                     id="id not the signed one"),
        pytest.param(SECRET, {**signed_headers(), "webhook-timestamp": "17e8"}, BODY, NOW,
                     id="timestamp not digits"),
        pytest.param(SECRET, {**signed_headers(), "webhook-signature": "v2," + signed_headers()
                     ["webhook-signature"][3:]}, BODY, NOW, id="unknown version"),
        *[pytest.param(SECRET, {k: v for k, v in signed_headers().items() if k != missing},
                       BODY, NOW, id=f"missing {missing}")
          for missing in ("webhook-id", "webhook-timestamp", "webhook-signature")],
        pytest.param("whsec_not base64!", signed_headers(), BODY, NOW, id="malformed secret"),
    ],
)
def test_verify_rejects(secret: str, headers: dict[str, str], body: bytes, now: int) -> None:
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, headers, body, now=now)


def test_verify_uses_the_clock_and_tolerance() -> None:
    # Given a signature made just now, When checked without ``now``, Then it passes
    stamp = int(time.time())
    assert verify_webhook(SECRET, signed_headers(timestamp=stamp), BODY)
    # And an hour-old one passes only with a wide enough tolerance
    old = signed_headers(timestamp=stamp - 3600)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, old, BODY)
    assert verify_webhook(SECRET, old, BODY, tolerance=3700)


def test_verify_rejects_a_signed_body_that_is_not_an_object() -> None:
    body = b"[1, 2]"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(SECRET, signed_headers(body=body), body, now=NOW)
