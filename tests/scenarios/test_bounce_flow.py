"""Bounces and complaints end to end: a delivered message, a webhook, then suppression."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import DSN_TOKEN, auth, unique_email
from tests.scenarios.test_send_path import register, send, wait_final

pytestmark = pytest.mark.usefixtures("worker")


def dsn_report(recipient: str, message_id: str, status: str = "5.1.1",
               action: str = "failed", diagnostic: str = "user unknown") -> bytes:
    """A multipart/report delivery-status message as a receiving MTA writes it (RFC 3464)."""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
        "To: bounces@example.test\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Date: Mon, 01 Jan 2024 00:00:10 +0000\r\n"
        f"Message-ID: <report-{message_id.strip('<>')}@mx.example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nNot delivered.\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} {diagnostic}\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Example <no-reply@example.test>\r\nTo: {recipient}\r\n"
        f"Subject: Spring news\r\nMessage-ID: {message_id}\r\n\r\n"
        "--B--\r\n"
    ).encode()


def post_dsn(client: Any, body: bytes, token: str = DSN_TOKEN) -> Any:
    return client.post("/webhooks/dsn", content=body,
                       headers={"Authorization": f"Bearer {token}",
                                "Content-Type": "message/rfc822"})


def test_hard_bounce_suppresses_every_category(client: Any, keys: dict[str, str]) -> None:
    # Given a promotion delivered to an opted-in recipient
    address = unique_email("bounce")
    external_id = register(client, keys["recipients"], address)
    r = client.post(f"/v1/recipients/{external_id}/consents",
                    json={"topic": "newsletter", "granted": True, "source": "signup_form",
                          "evidence": {"form": "https://example.test/f", "ip": "192.0.2.1"}},
                    headers=auth(keys["recipients"]))
    assert r.status_code == 201
    to = {"email": address, "external_id": external_id}
    sent = send(client, keys["marketing"], template="newsletter", to=to,
                data={"name": "A", "headline": "H", "body": "B"})
    final = wait_final(client, keys["marketing"], sent.json()["id"])
    assert final["status"] == "sent"

    # When a hard-bounce report for it arrives, twice (providers redeliver)
    report = dsn_report(address, final["message_id"])
    first = post_dsn(client, report)
    assert first.status_code == 200, first.text
    assert first.json()["applied"] == 1
    again = post_dsn(client, report)
    assert again.json() == {"applied": 0, "duplicates": 1, "unmatched": 0, "unrecognised": 0}

    # Then the message is bounced, with the event in its history
    bounced = client.get(f"/v1/messages/{sent.json()['id']}", headers=auth(keys["marketing"]))
    assert bounced.json()["status"] == "bounced"
    assert any(e["type"] == "webhook_hard_bounce" for e in bounced.json()["events"])
    # And the next message of every category is suppressed hard_bounce
    cases = [
        ("transactional", "registration_confirmation",
         {"name": "A", "confirm_url": "https://example.test/c"}),
        ("transactional", "service_alert", {"name": "A", "title": "T", "body": "B"}),
        ("legal", "legal_notice", {"name": "A", "title": "T", "body": "B"}),
        ("marketing", "newsletter", {"name": "A", "headline": "H", "body": "B"}),
    ]
    for role, template, data in cases:
        result = send(client, keys[role], template=template, to=to, data=data).json()
        assert (result["status"], result.get("reason")) == ("suppressed", "hard_bounce"), template
    # And the suppression list has exactly one entry for it
    view = client.get(f"/v1/recipients/{external_id}", headers=auth(keys["recipients"])).json()
    assert [s["reason"] for s in view["suppressions"]] == ["hard_bounce"]


def test_policy_rejection_suppresses_nobody(client: Any, keys: dict[str, str]) -> None:
    # Given a delivered registration confirmation
    address = unique_email("policy")
    sent = send(client, keys["transactional"], template="service_alert",
                to={"email": address, "external_id": register(client, keys["recipients"],
                                                               address)},
                data={"name": "A", "title": "T", "body": "B"})
    final = wait_final(client, keys["transactional"], sent.json()["id"])
    # When the report says 5.7.1 (our sending policy, not their mailbox; a 5.7.1 whose
    # text says "user unknown" would be a hard bounce, SPEC 4)
    r = post_dsn(client, dsn_report(address, final["message_id"], status="5.7.1",
                                    diagnostic="Message rejected by policy"))
    assert r.status_code == 200
    # Then a later alert still goes
    again = send(client, keys["transactional"], template="service_alert",
                 to={"email": address}, data={"name": "A", "title": "T2", "body": "B"})
    assert again.json()["status"] == "queued"


def test_dsn_webhook_rejects_bad_requests(client: Any, runtime: Any) -> None:
    from sqlalchemy import func, select

    from mailer.store.schema import suppressions

    def count() -> int:
        with runtime.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(suppressions)).scalar_one())

    before = count()
    report = dsn_report(unique_email("x"), "<nothing@example.test>")
    assert post_dsn(client, report, token="wrong").status_code == 401
    assert client.post("/webhooks/dsn", content=report).status_code == 401
    # A report without its delivery-status part cannot be understood: 400
    bad = post_dsn(client, b"Content-Type: multipart/report; report-type=delivery-status"
                           b"\r\n\r\ngarbage")
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["code"] == "unparseable"
    assert client.post("/webhooks/sendgrid", content=b"[]").status_code == 404
    huge = post_dsn(client, b"x" * (6 * 1024 * 1024))
    assert huge.status_code == 413
    assert count() == before
