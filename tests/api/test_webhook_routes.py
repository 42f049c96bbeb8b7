"""Webhooks through HTTP into the store: complaints, soft bounces, deliveries, rejections."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from tests.conftest import auth, unique_email
from tests.scenarios.test_send_path import register, send, wait_final
from tests.webhooks.signing import basic_auth, sendgrid_headers, sendgrid_key_text

pytestmark = pytest.mark.usefixtures("worker")

POSTMARK = ("postmark-hook", "postmark-secret-password")


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def hooks(env: dict[str, str], signing_key: ec.EllipticCurvePrivateKey) -> Iterator[Any]:
    """The app with SendGrid and Postmark configured (the shared DB, Redis and worker)."""
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.runtime import Runtime

    configured = {
        **env,
        "MAILER_SENDGRID_PUBLIC_KEY": sendgrid_key_text(signing_key),
        "MAILER_POSTMARK_WEBHOOK_USER": POSTMARK[0],
        "MAILER_POSTMARK_WEBHOOK_PASSWORD": POSTMARK[1],
    }
    rt = Runtime.from_settings(Settings.from_environ(configured))
    with TestClient(create_app(rt)) as client:
        yield client


def opted_in(client: Any, keys: dict[str, str]) -> tuple[str, str]:
    address = unique_email("hook")
    external_id = register(client, keys["recipients"], address)
    r = client.post(f"/v1/recipients/{external_id}/consents",
                    json={"topic": "newsletter", "granted": True, "source": "signup_form",
                          "evidence": {"form": "https://example.test/f", "ip": "192.0.2.1"}},
                    headers=auth(keys["recipients"]))
    assert r.status_code == 201
    return address, external_id


def post_sendgrid(client: Any, key: ec.EllipticCurvePrivateKey, events: list[Any]) -> Any:
    body = json.dumps(events).encode()
    headers = sendgrid_headers(key, str(int(time.time())), body)
    return client.post("/webhooks/sendgrid", content=body,
                       headers={**headers, "Content-Type": "application/json"})


def test_complaint_blocks_marketing_and_alerts_but_not_legal(
    hooks: Any, keys: dict[str, str], signing_key: ec.EllipticCurvePrivateKey
) -> None:
    # Given a delivered promotion
    address, external_id = opted_in(hooks, keys)
    to = {"email": address, "external_id": external_id}
    sent = send(hooks, keys["marketing"], template="newsletter", to=to,
                data={"name": "A", "headline": "H", "body": "B"})
    final = wait_final(hooks, keys["marketing"], sent.json()["id"])
    assert final["status"] == "sent"

    # When SendGrid reports a spam complaint for it
    event = {"email": address, "timestamp": int(time.time()), "event": "spamreport",
             "sg_event_id": uuid.uuid4().hex, "smtp-id": final["message_id"]}
    r = post_sendgrid(hooks, signing_key, [event])
    assert r.status_code == 200, r.text
    assert r.json()["applied"] == 1

    # Then the message is complained, marketing is suppressed and every topic revoked
    msg = hooks.get(f"/v1/messages/{sent.json()['id']}", headers=auth(keys["marketing"]))
    assert msg.json()["status"] == "complained"
    view = hooks.get(f"/v1/recipients/{external_id}", headers=auth(keys["recipients"])).json()
    assert [s["reason"] for s in view["suppressions"]] == ["complaint"]
    assert view["preferences"]["newsletter"]["subscribed"] is False
    assert view["preferences"]["newsletter"]["source"] == "complaint"
    assert all(not p["subscribed"] for p in view["preferences"].values())
    # And promotions and service alerts are blocked, while a legal notice still goes
    promo = send(hooks, keys["marketing"], template="newsletter", to=to,
                 data={"name": "A", "headline": "H", "body": "B"}).json()
    alert = send(hooks, keys["transactional"], template="service_alert", to=to,
                 data={"name": "A", "title": "T", "body": "B"}).json()
    legal = send(hooks, keys["legal"], template="legal_notice", to=to,
                 data={"name": "A", "title": "T", "body": "B"}).json()
    assert (promo["status"], promo["reason"]) == ("suppressed", "complaint")
    assert (alert["status"], alert["reason"]) == ("suppressed", "complaint")
    assert legal["status"] == "queued"
    # And a grant by an operator cannot silently re-subscribe them
    again = hooks.post(f"/v1/recipients/{external_id}/consents",
                       json={"topic": "newsletter", "granted": True, "source": "import"},
                       headers=auth(keys["recipients"]))
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "consent_conflict"


def postmark(client: Any, payload: dict[str, Any], creds: tuple[str, str] = POSTMARK) -> Any:
    return client.post("/webhooks/postmark", json=payload, headers=basic_auth(*creds))


def test_soft_bounces_reach_the_limit_and_a_delivery_clears_it(
    hooks: Any, keys: dict[str, str], runtime: Any
) -> None:
    from mailer.store.schema import suppressions

    address, external_id = opted_in(hooks, keys)
    to = {"email": address, "external_id": external_id}
    promo = {"name": "A", "headline": "H", "body": "B"}
    # A report acts only on mail we sent (SPEC 4): these records carry Postmark's own
    # MessageID, not ours, so they are tied by a promotion sent to the address just now.
    first = send(hooks, keys["marketing"], template="newsletter", to=to, data=promo)
    assert wait_final(hooks, keys["marketing"], first.json()["id"])["status"] == "sent"

    def bounce(n: int) -> Any:
        return postmark(hooks, {
            "RecordType": "Bounce", "ID": 9_000_000 + n + int(uuid.uuid4().int % 1_000_000),
            "Type": "SoftBounce", "TypeCode": 4096, "Email": address,
            "BouncedAt": "2026-11-24T10:00:00Z", "Details": "452 4.2.2 mailbox full",
            "MessageID": str(uuid.uuid4()),
        })

    # Given two soft bounces, promotions still go
    for n in range(2):
        assert bounce(n).json()["applied"] == 1
    assert send(hooks, keys["marketing"], template="newsletter", to=to,
                data=promo).json()["status"] == "queued"
    # When the third arrives within the window
    assert bounce(2).json()["applied"] == 1
    # Then promotions are suppressed soft_bounce_limit, with an expiry in 30 days
    blocked = send(hooks, keys["marketing"], template="newsletter", to=to, data=promo).json()
    assert (blocked["status"], blocked["reason"]) == ("suppressed", "soft_bounce_limit")
    view = hooks.get(f"/v1/recipients/{external_id}", headers=auth(keys["recipients"])).json()
    [entry] = view["suppressions"]
    assert entry["reason"] == "soft_bounce_limit" and entry["expires_at"] is not None
    # When a delivery is reported for the address
    delivered = postmark(hooks, {"RecordType": "Delivery", "MessageID": str(uuid.uuid4()),
                                 "Recipient": address, "DeliveredAt": "2026-11-24T11:00:00Z",
                                 "Details": "ok", "ServerID": 1})
    assert delivered.json()["applied"] == 1
    # Then the suppression is gone and promotions go again
    with runtime.engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(suppressions).where(
            suppressions.c.email == address)).scalar_one()
    assert left == 0
    assert send(hooks, keys["marketing"], template="newsletter", to=to,
                data=promo).json()["status"] == "queued"


def test_rejected_webhooks_change_nothing(
    hooks: Any, keys: dict[str, str], runtime: Any, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    from mailer.store.schema import consent_events, suppressions, webhook_events

    def state() -> tuple[int, ...]:
        with runtime.engine.connect() as conn:
            return tuple(
                conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in (suppressions, consent_events, webhook_events)
            )

    address, _ = opted_in(hooks, keys)
    before = state()
    event = {"email": address, "timestamp": int(time.time()), "event": "spamreport",
             "sg_event_id": uuid.uuid4().hex}
    body = json.dumps([event]).encode()
    headers = {**sendgrid_headers(signing_key, str(int(time.time())), body),
               "Content-Type": "application/json"}
    # A bit-flipped body, a signature from another key, a stale timestamp, no signature
    flipped = body.replace(b"spamreport", b"spamrepost")
    other = ec.generate_private_key(ec.SECP256R1())
    stale = str(int(time.time()) - 301)
    attempts = [
        hooks.post("/webhooks/sendgrid", content=flipped, headers=headers),
        hooks.post("/webhooks/sendgrid", content=body,
                   headers={**sendgrid_headers(other, headers[
                       "X-Twilio-Email-Event-Webhook-Timestamp"], body)}),
        hooks.post("/webhooks/sendgrid", content=body,
                   headers=sendgrid_headers(signing_key, stale, body)),
        hooks.post("/webhooks/sendgrid", content=body),
        postmark(hooks, {"RecordType": "SpamComplaint", "ID": 1, "Email": address},
                 creds=(POSTMARK[0], "wrong")),
    ]
    for response in attempts:
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "verification_failed"
    # A verified but unparseable body is 400; nothing is applied either way
    junk = b"{not json"
    r = hooks.post("/webhooks/sendgrid", content=junk,
                   headers=sendgrid_headers(signing_key, str(int(time.time())), junk))
    assert r.status_code == 400
    assert state() == before
