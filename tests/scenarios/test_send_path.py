"""The send path end to end: HTTP API -> database -> Redis -> real worker -> real SMTP."""

from __future__ import annotations

import email
from email import policy
from typing import Any

import pytest

from tests.conftest import auth, unique_email, wait_for

pytestmark = pytest.mark.usefixtures("worker")


def status_of(client: Any, key: str, message_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/messages/{message_id}", headers=auth(key))
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_final(client: Any, key: str, message_id: str) -> dict[str, Any]:
    """Wait until the message leaves queued/sending, and return it."""
    return dict(wait_for(lambda: (
        (m := status_of(client, key, message_id))["status"] not in ("queued", "sending") and m
    )))


def delivered(smtp_server: Any, message_id_header: str) -> list[Any]:
    """Messages the SMTP server accepted with this Message-ID."""
    found = []
    for item in list(smtp_server.messages):
        parsed = email.message_from_bytes(item.data, policy=policy.default)
        if parsed["Message-ID"] == message_id_header:
            found.append(parsed)
    return found


def send(client: Any, key: str, **body: Any) -> Any:
    return client.post("/v1/messages", json=body, headers=auth(key))


def register(client: Any, key: str, email_address: str, active: bool = True) -> str:
    external_id = f"ext-{email_address.split('@')[0]}"
    response = client.put(
        f"/v1/recipients/{external_id}",
        json={"email": email_address, "name": "Ada", "account_active": active},
        headers=auth(key),
    )
    assert response.status_code in (200, 201), response.text
    return external_id


def test_registration_confirmation_is_sent_once(client: Any, keys: dict[str, str],
                                                smtp_server: Any) -> None:
    # Given a new address
    address = unique_email("reg")
    data = {"name": "Ada", "confirm_url": "https://example.test/confirm/abc"}
    # When a registration confirmation is sent
    first = send(client, keys["transactional"], template="registration_confirmation",
                 to=address, data=data)
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "queued"
    assert first.json()["category"] == "registration_confirmation"
    # Then it is delivered, with the Message-ID fixed at acceptance
    final = wait_final(client, keys["transactional"], first.json()["id"])
    assert final["status"] == "sent", final
    [mail] = wait_for(lambda: delivered(smtp_server, final["message_id"]))
    assert mail["To"] == address
    assert mail["List-Unsubscribe"] is None  # transactional mail carries none
    assert "https://example.test/confirm/abc" in mail.get_body(("plain",)).get_content()
    # And a second one to the same address is suppressed already_sent at once
    second = send(client, keys["transactional"], template="registration_confirmation",
                  to=address, data=data)
    assert second.status_code == 202
    assert second.json()["status"] == "suppressed"
    assert second.json()["reason"] == "already_sent"


def test_fourth_service_alert_in_a_week_is_capped(client: Any, keys: dict[str, str]) -> None:
    # Given a recipient with an active account
    address = unique_email("alert")
    external_id = register(client, keys["recipients"], address)
    to = {"email": address, "external_id": external_id}
    data = {"name": "Ada", "title": "Your storage is nearly full", "body": "90% used."}
    # When four service alerts are sent within the week
    results = [send(client, keys["transactional"], template="service_alert", to=to, data=data)
               for _ in range(4)]
    # Then three are queued and the fourth is suppressed frequency_cap
    assert [r.json()["status"] for r in results] == ["queued"] * 3 + ["suppressed"]
    assert results[3].json()["reason"] == "frequency_cap"
    for r in results[:3]:
        assert wait_final(client, keys["transactional"], r.json()["id"])["status"] == "sent"


def test_service_alert_needs_an_account(client: Any, keys: dict[str, str]) -> None:
    # Given an address with no profile, When a service alert is sent, Then it is suppressed
    response = send(client, keys["transactional"], template="service_alert", to=unique_email(),
                    data={"name": "A", "title": "T", "body": "B"})
    assert response.json()["status"] == "suppressed"
    assert response.json()["reason"] == "no_account"


def test_legal_notice_reaches_someone_who_revoked_all_marketing(
    client: Any, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a recipient who granted and then revoked every marketing topic
    address = unique_email("legal")
    external_id = register(client, keys["recipients"], address)
    topics = [t["name"] for t in client.get("/v1/topics", headers=auth(keys["recipients"]))
              .json()["topics"]]
    for topic in [*topics, "third_party_sharing"]:
        for granted in (True, False):
            r = client.post(f"/v1/recipients/{external_id}/consents",
                            json={"topic": topic, "granted": granted, "source": "signup_form",
                                  "evidence": {"form": "https://example.test/signup",
                                               "ip": "192.0.2.1"}},
                            headers=auth(keys["recipients"]))
            assert r.status_code == 201, r.text
    # When a legal notice is sent
    response = send(client, keys["legal"], template="legal_notice",
                    to={"email": address, "external_id": external_id},
                    data={"name": "Ada", "title": "Privacy policy update", "body": "v2"})
    # Then it is delivered anyway
    assert response.json()["status"] == "queued", response.text
    final = wait_final(client, keys["legal"], response.json()["id"])
    assert final["status"] == "sent"
    assert wait_for(lambda: delivered(smtp_server, final["message_id"]))


def test_promotion_follows_consent_and_send_time_check_wins(
    client: Any, keys: dict[str, str], runtime: Any, smtp_server: Any
) -> None:
    address = unique_email("promo")
    external_id = register(client, keys["recipients"], address)
    to = {"email": address, "external_id": external_id}
    data = {"name": "Ada", "headline": "Spring news", "body": "All about spring."}
    consents = f"/v1/recipients/{external_id}/consents"

    # Given no consent, a promotion is suppressed no_consent
    first = send(client, keys["marketing"], template="newsletter", to=to, data=data)
    assert first.status_code == 202
    assert (first.json()["status"], first.json()["reason"]) == ("suppressed", "no_consent")

    # Given a grant, it is delivered with one-click unsubscribe headers and the footer
    r = client.post(consents, json={"topic": "newsletter", "granted": True,
                                    "source": "signup_form",
                                    "evidence": {"form": "https://example.test/signup",
                                                 "ip": "192.0.2.1"}},
                    headers=auth(keys["recipients"]))
    assert r.status_code == 201, r.text
    second = send(client, keys["marketing"], template="newsletter", to=to, data=data)
    assert second.json()["status"] == "queued"
    final = wait_final(client, keys["marketing"], second.json()["id"])
    assert final["status"] == "sent", final
    [mail] = wait_for(lambda: delivered(smtp_server, final["message_id"]))
    assert mail["List-Unsubscribe"].startswith("<https://mail.example.test/u/")
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["List-Id"] == "<newsletter.example.test>"
    assert address not in mail["List-Unsubscribe"]
    text = mail.get_body(("plain",)).get_content()
    assert "Example Ltd, 1 Example Street" in text
    assert "/preferences/" in text

    # Given a third promotion accepted while consent holds but not yet handed to a worker
    from mailer.keys import authenticate
    from mailer.sending.accept import Accepted, Acceptor, SendRequest
    from mailer.sending.queue import ListEnqueuer, RedisEnqueuer

    held = ListEnqueuer()
    original = runtime.enqueuer
    runtime.enqueuer = held
    try:
        with runtime.engine.connect() as conn:
            key = authenticate(conn, keys["marketing"])
        [third] = Acceptor(runtime).accept(key, [SendRequest(
            template="newsletter", email=address, external_id=external_id, data=data,
            body={"n": 3})])
    finally:
        runtime.enqueuer = original
    assert isinstance(third, Accepted) and third.status == "queued"
    # When the person revokes while it is still queued (one-click, from the mail they have)
    one_click = mail["List-Unsubscribe"].strip("<>").removeprefix(runtime.settings.public_url)
    r = client.post(one_click, content=b"List-Unsubscribe=One-Click",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    # And the worker then gets the message
    RedisEnqueuer(runtime.settings.redis_url).enqueue(held.batches[0][0])
    # Then the send-time check suppresses it: the revoke wins
    final = wait_final(client, keys["marketing"], third.id)
    assert (final["status"], final["reason"]) == ("suppressed", "unsubscribed")
    assert final["attempts"] == 1
    assert not delivered(smtp_server, final["message_id"])


def test_scopes_limit_categories(client: Any, keys: dict[str, str]) -> None:
    # Given a transactional key, Then legal notices and promotions are 403 with the error body
    for template, data in (
        ("legal_notice", {"name": "A", "title": "T", "body": "B"}),
        ("newsletter", {"name": "A", "headline": "H", "body": "B"}),
    ):
        r = send(client, keys["transactional"], template=template, to=unique_email(), data=data)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "forbidden"
    # And no key at all is 401
    r = client.post("/v1/messages", json={"template": "legal_notice", "to": unique_email()})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"template": "registration_confirmation", "to": "not-an-address",
          "data": {"name": "A", "confirm_url": "u"}}, "invalid_address"),
        ({"template": "no_such_template", "to": "a@example.org", "data": {}},
         "unknown_template"),
        ({"template": "registration_confirmation", "to": "a@example.org",
          "data": {"name": "A"}}, "missing_variable"),
        ({"template": "service_alert", "to": "a@example.org",
          "data": {"name": "A", "title": "Hi=?UTF-8?Q?=0A?=Bcc: victim@example.net",
                   "body": "B"}}, "invalid_header"),
        ({"template": "service_alert", "to": "a@example.org",
          "data": {"name": "A", "title": "Hi\r\nBcc: victim@example.net", "body": "B"}},
         "invalid_header"),
        ({"template": "registration_confirmation",
          "to": {"email": "a@example.org", "name": "Eve\nBcc: x@example.net"},
          "data": {"name": "A", "confirm_url": "u"}}, "invalid_header"),
    ],
)
def test_bad_input_is_422_and_writes_nothing(
    client: Any, keys: dict[str, str], runtime: Any, body: dict[str, Any], code: str
) -> None:
    from sqlalchemy import func, select

    from mailer.store.schema import messages

    def count() -> int:
        with runtime.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(messages)).scalar_one())

    before = count()
    r = send(client, keys["admin"], **body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert set(r.json()["error"]) == {"code", "message", "details"}
    assert count() == before


def test_idempotency_key_gives_one_message(client: Any, keys: dict[str, str],
                                           runtime: Any) -> None:
    from sqlalchemy import func, select

    from mailer.store.schema import messages

    address = unique_email("idem")
    body = {"template": "registration_confirmation", "to": address,
            "data": {"name": "A", "confirm_url": "https://example.test/c"}}
    headers = {**auth(keys["transactional"]), "Idempotency-Key": f"k-{address}"}
    # When the same request is sent twice with one key
    first = client.post("/v1/messages", json=body, headers=headers)
    again = client.post("/v1/messages", json=body, headers=headers)
    # Then both answers are the same and one row exists
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    with runtime.engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(messages)
                         .where(messages.c.to_email == address)).scalar_one()
    assert n == 1
    # And the same key with a different body is 409
    changed = client.post("/v1/messages", json={**body, "data": {"name": "B",
                                                                 "confirm_url": "x"}},
                          headers=headers)
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "idempotency_conflict"


def test_batch_returns_results_in_order(client: Any, keys: dict[str, str]) -> None:
    good = {"template": "registration_confirmation", "to": unique_email("batch"),
            "data": {"name": "A", "confirm_url": "https://example.test/c"}}
    bad = {"template": "registration_confirmation", "to": "broken", "data": {}}
    r = client.post("/v1/messages/batch", json={"messages": [good, bad, {"nonsense": 1}]},
                    headers=auth(keys["transactional"]))
    assert r.status_code == 202, r.text
    results = r.json()["results"]
    assert results[0]["status"] == "queued"
    assert results[1]["error"]["code"] == "invalid_address"
    assert results[2]["error"]["code"] == "validation_error"
    assert wait_final(client, keys["transactional"], results[0]["id"])["status"] == "sent"


def test_operations_endpoints(client: Any, keys: dict[str, str]) -> None:
    # Given a running system, Then health, readiness, metrics and stats answer
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok"}
    send(client, keys["transactional"], template="registration_confirmation",
         to=unique_email("ops"), data={"name": "A", "confirm_url": "https://example.test/c"})
    metrics = client.get("/metrics").text
    assert 'mailer_messages{category="registration_confirmation"' in metrics
    stats = client.get("/v1/stats", headers=auth(keys["admin"]))
    assert stats.status_code == 200
    counts = stats.json()["counts"]
    assert any(c["category"] == "registration_confirmation" and c["count"] >= 1 for c in counts)
    assert "@" not in stats.text  # aggregate only: no addresses
    assert client.get("/v1/stats", headers=auth(keys["transactional"])).status_code == 403
