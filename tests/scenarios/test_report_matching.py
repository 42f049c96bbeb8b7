"""A report acts only on mail we sent (SPEC 4), for every webhook source, through HTTP.

Each source gets the payload its provider really sends, signed as it signs it: SES via a
signed SNS envelope, SendGrid's ECDSA headers, Mailgun's HMAC, Postmark's basic auth and
our MTA's bearer token for DSN (bounces) and ARF (complaints). Mail is really sent first,
through the API, a real worker and a real SMTP server, so "mail we sent" is the real thing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select

from tests.conftest import DSN_TOKEN, unique_email
from tests.scenarios.test_send_path import register, send, wait_final
from tests.webhooks.signing import (
    basic_auth,
    fixture_json,
    self_signed_cert,
    sendgrid_headers,
    sendgrid_key_text,
    sign_sns,
)

pytestmark = [pytest.mark.usefixtures("worker"), pytest.mark.db]

SOURCES = ["ses", "sendgrid", "mailgun", "postmark", "dsn"]
KINDS = ["bounce", "complaint"]
POSTMARK = ("postmark-hook", "postmark-secret-password")
MAILGUN_KEY = "mailgun-signing-key-0123456789"
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
#: Tables an unmatched report must leave alone: all but its own records (and the excerpt
#: kept of an unreadable one) and the Mailgun replay store, which remembers every authentic
#: request's one-time token by design.
SKIPPED_TABLES = ("bounce_reports", "seen_tokens", "unrecognised_reports")


@dataclass(frozen=True)
class Keys:
    """The providers' signing keys, made here."""

    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey


@dataclass
class Hooks:
    """The API with every source configured: on today's clock and on one 31 days ahead."""

    now: Any
    late: Any
    runtime: Any
    late_runtime: Any
    keys: Keys


@dataclass(frozen=True)
class Person:
    """A registered recipient, with the Message-ID and row id of mail we sent them, if any."""

    email: str
    external_id: str
    message_id: str | None = None
    row_id: str | None = None


@pytest.fixture(scope="module")
def hooks(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooks]:
    """Two apps on the shared database, Redis and worker, every webhook source configured."""
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app
    from mailer.config import Settings
    from mailer.runtime import Runtime, utcnow

    keys = Keys(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ec.generate_private_key(ec.SECP256R1()))
    cert_dir = tmp_path_factory.mktemp("sns-certs")
    cert_url = fixture_json("sns_notification.json")["SigningCertURL"]
    (cert_dir / cert_url.rsplit("/", 1)[1]).write_bytes(self_signed_cert(keys.rsa))
    configured = {
        **env,
        "MAILER_SES_TOPIC_ARNS": TOPIC,
        "MAILER_SNS_CERT_DIR": str(cert_dir),
        "MAILER_SENDGRID_PUBLIC_KEY": sendgrid_key_text(keys.ec),
        "MAILER_MAILGUN_SIGNING_KEY": MAILGUN_KEY,
        "MAILER_POSTMARK_WEBHOOK_USER": POSTMARK[0],
        "MAILER_POSTMARK_WEBHOOK_PASSWORD": POSTMARK[1],
    }
    rt = Runtime.from_settings(Settings.from_environ(configured))
    late_rt = Runtime.from_settings(Settings.from_environ(configured))
    late_rt.clock = lambda: utcnow() + timedelta(days=31)
    with TestClient(create_app(rt)) as now, TestClient(create_app(late_rt)) as late:
        yield Hooks(now, late, rt, late_rt, keys)


def person(client: Any, keys: dict[str, str]) -> Person:
    """Register someone we have never mailed."""
    address = unique_email("match")
    return Person(address, register(client, keys["recipients"], address))


def mailed(client: Any, keys: dict[str, str]) -> Person:
    """Register someone and really send them a service alert; wait until it is sent."""
    who = person(client, keys)
    sent = send(client, keys["transactional"], template="service_alert",
                to={"email": who.email, "external_id": who.external_id},
                data={"name": "A", "title": "T", "body": "B"})
    assert sent.status_code == 202, sent.text
    final = wait_final(client, keys["transactional"], sent.json()["id"])
    assert final["status"] == "sent", final
    return Person(who.email, who.external_id, final["message_id"], sent.json()["id"])


@pytest.fixture(scope="module")
def cast(hooks: Hooks, runtime: Any) -> dict[str, Person]:
    """Two people we mailed just now and one we never mailed, shared by the unmatched cases."""
    from mailer.keys import create_key

    with runtime.engine.begin() as conn:
        keys = {name: create_key(conn, f"match-{name}", [scope]) for name, scope in
                (("recipients", "recipients"), ("transactional", "messages:transactional"))}
    return {"a": mailed(hooks.now, keys), "b": mailed(hooks.now, keys),
            "never": person(hooks.now, keys)}


# --- what each provider sends -------------------------------------------------------------


def foreign_id() -> str:
    """A Message-ID we never issued."""
    return f"<{uuid.uuid4().hex}@elsewhere.example>"


def ses_report(keys: Keys, now: datetime, kind: str, to: str | None,
               message_id: str | None) -> tuple[str, bytes, dict[str, str]]:
    """An SNS Notification carrying an SES Bounce or Complaint, signed with SignatureVersion 2."""
    message = fixture_json("ses_bounce.json" if kind == "bounce" else "ses_complaint.json")
    entry: dict[str, Any] = {} if to is None else {"emailAddress": to}
    if kind == "bounce":
        entry.update(action="failed", status="5.1.1",
                     diagnosticCode="smtp; 550 5.1.1 user unknown")
        message["bounce"].update(bouncedRecipients=[entry], timestamp=_iso(now))
    else:
        message["complaint"].update(complainedRecipients=[entry], timestamp=_iso(now))
    mail = message["mail"]
    mail["destination"] = [to] if to else []
    mail["headers"] = [h for h in mail["headers"] if h["name"] != "Message-ID"]
    mail["commonHeaders"].pop("messageId")
    if message_id is not None:
        mail["headers"].append({"name": "Message-ID", "value": message_id})
        mail["commonHeaders"]["messageId"] = message_id
    envelope = fixture_json("sns_notification.json")
    envelope.update(Message=json.dumps(message), MessageId=str(uuid.uuid4()),
                    Timestamp=_iso(now))
    headers = {"x-amz-sns-message-type": "Notification",
               "Content-Type": "text/plain; charset=UTF-8"}
    return "/webhooks/ses", sign_sns(envelope, keys.rsa), headers


def sendgrid_report(keys: Keys, now: datetime, kind: str, to: str | None,
                    message_id: str | None) -> tuple[str, bytes, dict[str, str]]:
    """A one-event SendGrid batch, signed over timestamp + body."""
    item: dict[str, Any] = {"timestamp": int(now.timestamp()), "sg_event_id": uuid.uuid4().hex,
                            "sg_message_id": f"{uuid.uuid4().hex}.filterdrecv-1.0"}
    if to is not None:
        item["email"] = to
    if message_id is not None:
        item["smtp-id"] = message_id
    if kind == "bounce":
        item.update(event="bounce", type="bounce", status="5.1.1",
                    reason="550 5.1.1 The email account does not exist.")
    else:
        item.update(event="spamreport")
    body = json.dumps([item]).encode()
    headers = sendgrid_headers(keys.ec, str(int(now.timestamp())), body)
    return "/webhooks/sendgrid", body, {**headers, "Content-Type": "application/json"}


def mailgun_report(keys: Keys, now: datetime, kind: str, to: str | None,
                   message_id: str | None) -> tuple[str, bytes, dict[str, str]]:
    """A Mailgun failed/permanent or complained event with its HMAC signature block."""
    payload = fixture_json("mailgun_failed_permanent.json" if kind == "bounce"
                           else "mailgun_complained.json")
    data = payload["event-data"]
    data.update(id=uuid.uuid4().hex, timestamp=now.timestamp())
    if to is None:
        del data["recipient"]
    else:
        data["recipient"] = to
    headers = data["message"]["headers"]
    headers.pop("message-id")
    if message_id is not None:
        headers["message-id"] = message_id.strip("<>")  # Mailgun drops the brackets
    stamp, token = str(int(now.timestamp())), secrets.token_hex(25)
    digest = hmac.new(MAILGUN_KEY.encode(), (stamp + token).encode(), hashlib.sha256)
    payload["signature"] = {"timestamp": stamp, "token": token, "signature": digest.hexdigest()}
    return "/webhooks/mailgun", json.dumps(payload).encode(), {"Content-Type": "application/json"}


def postmark_report(keys: Keys, now: datetime, kind: str, to: str | None,
                    message_id: str | None) -> tuple[str, bytes, dict[str, str]]:
    """A Postmark HardBounce or SpamComplaint record; our Message-ID travels in Metadata."""
    record = fixture_json("postmark_bounce.json" if kind == "bounce"
                          else "postmark_spam_complaint.json")
    record.update(ID=secrets.randbelow(10**15), MessageID=str(uuid.uuid4()),
                  BouncedAt=_iso(now), Metadata={})
    if to is None:
        del record["Email"]
    else:
        record["Email"] = to
    if message_id is not None:
        record["Metadata"] = {"message-id": message_id}
    headers = {**basic_auth(*POSTMARK), "Content-Type": "application/json"}
    return "/webhooks/postmark", json.dumps(record).encode(), headers


def dsn_report(keys: Keys, now: datetime, kind: str, to: str | None,
               message_id: str | None) -> tuple[str, bytes, dict[str, str]]:
    """An RFC 3464 DSN (bounce) or RFC 5965 ARF report (complaint), as our MTA posts it."""
    body = (dsn_bytes if kind == "bounce" else arf_bytes)([to] if to else [], message_id, now)
    return "/webhooks/dsn", body, {"Authorization": f"Bearer {DSN_TOKEN}",
                                   "Content-Type": "message/rfc822"}


def dsn_bytes(recipients: list[str], message_id: str | None, now: datetime,
              nameless: bool = False) -> bytes:
    """A multipart/report delivery-status message with one failed block per recipient."""
    blocks = "".join(
        f"Original-Recipient: rfc822; {r}\r\nFinal-Recipient: rfc822; {r}\r\n"
        "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.example.org\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{r}>: Recipient address rejected: User unknown\r\n"
        "\r\n"
        for r in recipients
    )
    if not recipients or nameless:
        # The recipient is given only in an address type we never mail (x400).
        blocks += "Final-Recipient: x400; /G=Nobody/S=Example/\r\nAction: failed\r\n" \
                  "Status: 5.1.1\r\n\r\n"
    original = f"Message-ID: {message_id}\r\n" if message_id else ""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
        "To: bounces@example.test\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {_rfc5322(now)}\r\nMessage-ID: <{uuid.uuid4().hex}@mx.example.net>\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nNot delivered.\r\n\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"{blocks}"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Example <no-reply@example.test>\r\nSubject: Alert\r\n{original}\r\n"
        "--B--\r\n"
    ).encode()


def arf_bytes(recipients: list[str], message_id: str | None, now: datetime) -> bytes:
    """A feedback-report (abuse) naming ``recipients`` in Original-Rcpt-To."""
    rcpt = "".join(f"Original-Rcpt-To: <{r}>\r\n" for r in recipients)
    original = f"Message-ID: {message_id}\r\n" if message_id else ""
    return (
        "From: <complaints@isp.example>\r\nTo: <fbl@example.test>\r\nSubject: FW: Alert\r\n"
        f"Date: {_rfc5322(now)}\r\nMessage-ID: <{uuid.uuid4().hex}@isp.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="ARF"\r\n\r\n'
        "--ARF\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nAn abuse report.\r\n\r\n"
        "--ARF\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
        f"{rcpt}Arrival-Date: {_rfc5322(now)}\r\nReporting-MTA: dns; mx.isp.example\r\n\r\n"
        "--ARF\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Example <no-reply@example.test>\r\nSubject: Alert\r\n{original}\r\n"
        "--ARF--\r\n"
    ).encode()


Builder = Callable[[Keys, datetime, str, "str | None", "str | None"],
                   tuple[str, bytes, dict[str, str]]]
BUILDERS: dict[str, Builder] = {
    "ses": ses_report, "sendgrid": sendgrid_report, "mailgun": mailgun_report,
    "postmark": postmark_report, "dsn": dsn_report,
}


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _rfc5322(moment: datetime) -> str:
    return moment.strftime("%a, %d %b %Y %H:%M:%S +0000")


def post(client: Any, runtime: Any, keys: Keys, source: str, kind: str, to: str | None,
         message_id: str | None) -> Any:
    """Build the source's report dated by ``runtime``'s clock and POST it."""
    path, body, headers = BUILDERS[source](keys, runtime.clock(), kind, to, message_id)
    return client.post(path, content=body, headers=headers)


# --- what the store and /metrics say -------------------------------------------------------


def snapshot(runtime: Any) -> dict[str, list[str]]:
    """Every row of every table but the ones in :data:`SKIPPED_TABLES`."""
    from mailer.store.schema import metadata

    with runtime.engine.connect() as conn:
        return {
            table.name: sorted(repr(tuple(row)) for row in conn.execute(select(table)))
            for table in metadata.sorted_tables if table.name not in SKIPPED_TABLES
        }


def reports(runtime: Any) -> list[Any]:
    """The rows of ``bounce_reports``, oldest first."""
    from mailer.store.schema import bounce_reports

    with runtime.engine.connect() as conn:
        return list(conn.execute(select(bounce_reports).order_by(bounce_reports.c.id)))


def counted(client: Any, source: str, result: str) -> float:
    """``mailer_bounce_reports_total{source,result}`` as /metrics shows it now."""
    for line in client.get("/metrics").text.splitlines():
        name, _, rest = line.partition("{")
        labels, _, value = rest.partition("} ")
        if name == "mailer_bounce_reports_total" and sorted(labels.split(",")) == [
            f'result="{result}"', f'source="{source}"'
        ]:
            return float(value)
    raise AssertionError(f"no {source}/{result} series in /metrics")


def assert_changes_nothing(hooks: Hooks, client: Any, rt: Any, source: str, result: str,
                           send_report: Callable[[], Any], secret: str | None) -> None:
    """POST a report; assert 200, no table but ``bounce_reports`` changed, one ``result``."""
    before, rows_before = snapshot(rt), len(reports(rt))
    metric = counted(hooks.now, source, result)
    response = send_report()
    assert response.status_code == 200, response.text
    assert response.json()["applied"] == 0 and response.json()[result] == 1, response.json()
    # Then nothing else changed: no suppression, no revoke, no message status or event
    assert snapshot(rt) == before
    # And the report is recorded once, by keyed hash at most, never in clear
    new = reports(rt)[rows_before:]
    assert [(r.source, r.result) for r in new] == [(source, result)]
    if secret is not None:
        assert all(secret not in repr(tuple(r)) for r in new)
    # And /metrics counts it
    assert counted(hooks.now, source, result) == metric + 1


# --- unmatched: every way a report can fail to name mail we sent ----------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_report_for_an_address_never_mailed_changes_nothing(
    hooks: Hooks, cast: dict[str, Person], source: str, kind: str
) -> None:
    # Given a registered person we never mailed
    never = cast["never"].email
    # When a report names them without any Message-ID
    # Then it is unmatched, counted, and changes nothing
    assert_changes_nothing(
        hooks, hooks.now, hooks.runtime, source, "unmatched",
        lambda: post(hooks.now, hooks.runtime, hooks.keys, source, kind, never, None), never)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_report_naming_a_third_person_with_our_message_id_changes_nothing(
    hooks: Hooks, cast: dict[str, Person], source: str, kind: str
) -> None:
    # Given A got our mail, and B (whom we also mailed today) is someone else
    a, b = cast["a"], cast["b"]
    # When a report quotes A's real Message-ID but names B
    # Then it is unmatched: a Message-ID of ours ties a report to its own recipient only
    assert_changes_nothing(
        hooks, hooks.now, hooks.runtime, source, "unmatched",
        lambda: post(hooks.now, hooks.runtime, hooks.keys, source, kind, b.email, a.message_id),
        b.email)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_foreign_message_id_and_no_recent_mail_changes_nothing(
    hooks: Hooks, cast: dict[str, Person], source: str, kind: str
) -> None:
    # Given a person we never mailed / When a report names them with a Message-ID not ours
    never = cast["never"].email
    # Then it is unmatched (a foreign Message-ID counts as none) and changes nothing
    assert_changes_nothing(
        hooks, hooks.now, hooks.runtime, source, "unmatched",
        lambda: post(hooks.now, hooks.runtime, hooks.keys, source, kind, never, foreign_id()),
        never)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_mail_older_than_thirty_days_does_not_tie_a_report(
    hooks: Hooks, cast: dict[str, Person], source: str, kind: str
) -> None:
    # Given A was mailed, and our clock now reads 31 days later
    a = cast["a"]
    # When a report names A with a foreign Message-ID (its own dates say "today")
    # Then the 30-day window, counted on our clock, does not reach the mail: unmatched
    assert_changes_nothing(
        hooks, hooks.late, hooks.late_runtime, source, "unmatched",
        lambda: post(hooks.late, hooks.late_runtime, hooks.keys, source, kind, a.email,
                     foreign_id()),
        a.email)


@pytest.mark.parametrize("source", SOURCES)
def test_report_without_a_recipient_is_accepted_and_unrecognised(
    hooks: Hooks, source: str
) -> None:
    # Given a bounce that names no usable recipient and carries no Message-ID of ours
    # When posted / Then 200, counted as unrecognised, and nothing changes
    assert_changes_nothing(
        hooks, hooks.now, hooks.runtime, source, "unrecognised",
        lambda: post(hooks.now, hooks.runtime, hooks.keys, source, "bounce", None,
                     foreign_id()), None)


def test_redelivered_unmatched_report_is_counted_once(
    hooks: Hooks, cast: dict[str, Person]
) -> None:
    # Given an unmatched Postmark complaint already received
    path, body, headers = postmark_report(hooks.keys, hooks.runtime.clock(), "complaint",
                                          cast["never"].email, None)
    assert hooks.now.post(path, content=body, headers=headers).json()["unmatched"] == 1
    metric = counted(hooks.now, "postmark", "unmatched")
    # When Postmark delivers it again
    again = hooks.now.post(path, content=body, headers=headers)
    # Then it is a duplicate, and the count stays
    assert again.json() == {"applied": 0, "duplicates": 1, "unmatched": 0, "unrecognised": 0}
    assert counted(hooks.now, "postmark", "unmatched") == metric


# --- genuine reports still act -------------------------------------------------------------


def suppressions_of(runtime: Any, email: str) -> list[tuple[str, str]]:
    """(reason, scope) of every suppression of ``email``."""
    from mailer.store.schema import suppressions

    with runtime.engine.connect() as conn:
        return sorted((r.reason, r.scope) for r in conn.execute(
            select(suppressions).where(suppressions.c.email_hash == runtime.address(email).hash)))


def revoked_topics(runtime: Any, email: str) -> set[str]:
    """Topics revoked for ``email`` with source ``complaint``."""
    from mailer.store.schema import consent_events

    with runtime.engine.connect() as conn:
        return {r.topic for r in conn.execute(select(consent_events).where(
            consent_events.c.email_hash == runtime.address(email).hash,
            consent_events.c.source == "complaint", consent_events.c.granted.is_(False)))}


def message_status(runtime: Any, row_id: str) -> str:
    from mailer.store.schema import messages

    with runtime.engine.connect() as conn:
        return str(conn.execute(select(messages.c.status).where(messages.c.id == row_id))
                   .scalar_one())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_genuine_report_for_mail_we_sent_still_applies(
    hooks: Hooks, keys: dict[str, str], source: str, kind: str
) -> None:
    # Given a service alert we sent
    who = mailed(hooks.now, keys)
    assert who.message_id is not None and who.row_id is not None
    applied = counted(hooks.now, source, "applied")
    # When its provider reports a hard bounce or a complaint with our Message-ID
    r = post(hooks.now, hooks.runtime, hooks.keys, source, kind, who.email, who.message_id)
    assert r.status_code == 200, r.text
    assert r.json()["applied"] == 1, r.json()
    # Then it acts as before: a hard bounce suppresses everything and marks the message;
    # a complaint suppresses marketing, revokes every topic and marks the message
    if kind == "bounce":
        assert suppressions_of(hooks.runtime, who.email) == [("hard_bounce", "all")]
        assert message_status(hooks.runtime, who.row_id) == "bounced"
    else:
        assert suppressions_of(hooks.runtime, who.email) == [("complaint", "marketing")]
        assert "newsletter" in revoked_topics(hooks.runtime, who.email)
        assert message_status(hooks.runtime, who.row_id) == "complained"
        alert = send(hooks.now, keys["transactional"], template="service_alert",
                     to={"email": who.email, "external_id": who.external_id},
                     data={"name": "A", "title": "T", "body": "B"}).json()
        assert (alert["status"], alert.get("reason")) == ("suppressed", "complaint")
    # And /metrics counts it as applied
    assert counted(hooks.now, source, "applied") == applied + 1


@pytest.mark.parametrize("source", ["sendgrid", "postmark", "dsn"])
def test_report_without_our_message_id_is_tied_by_recent_mail(
    hooks: Hooks, keys: dict[str, str], source: str
) -> None:
    # Given a service alert we sent today
    who = mailed(hooks.now, keys)
    # When a hard bounce names its recipient with a Message-ID that is not ours
    r = post(hooks.now, hooks.runtime, hooks.keys, source, "bounce", who.email, foreign_id())
    # Then the mail sent within 30 days ties it, and the address is suppressed
    assert r.json()["applied"] == 1, r.json()
    assert suppressions_of(hooks.runtime, who.email) == [("hard_bounce", "all")]


def test_redacted_complaint_is_applied_to_our_message_recipient(
    hooks: Hooks, keys: dict[str, str]
) -> None:
    # Given a service alert we sent
    who = mailed(hooks.now, keys)
    # When an ARF complaint arrives with the recipient redacted but our Message-ID kept
    body = arf_bytes([], who.message_id, hooks.runtime.clock())
    r = hooks.now.post("/webhooks/dsn", content=body,
                       headers={"Authorization": f"Bearer {DSN_TOKEN}"})
    # Then the person our Message-ID names is the one who complained (SPEC 8)
    assert r.json()["applied"] == 1, r.json()
    assert suppressions_of(hooks.runtime, who.email) == [("complaint", "marketing")]


def test_one_report_acts_on_at_most_a_hundred_recipients(
    hooks: Hooks, keys: dict[str, str]
) -> None:
    from mailer.reports.apply import MAX_EVENTS

    # Given a DSN listing someone we mailed first, then 249 addresses we never mailed
    who = mailed(hooks.now, keys)
    strangers = [unique_email("stranger") for _ in range(249)]
    body = dsn_bytes([who.email, *strangers], foreign_id(), hooks.runtime.clock())
    rows_before = len(reports(hooks.runtime))
    # When posted
    r = hooks.now.post("/webhooks/dsn", content=body,
                       headers={"Authorization": f"Bearer {DSN_TOKEN}"})
    # Then the first 100 are read: one applied, 99 unmatched; the other 150 are not read
    # and are counted unrecognised in one aggregate row
    assert MAX_EVENTS["dsn"] == 100
    assert r.json() == {"applied": 1, "duplicates": 0, "unmatched": 99, "unrecognised": 150}
    assert suppressions_of(hooks.runtime, who.email) == [("hard_bounce", "all")]
    assert suppressions_of(hooks.runtime, strangers[0]) == []
    new = reports(hooks.runtime)[rows_before:]
    assert [r.count for r in new if r.reason == "over_limit"] == [150]
    assert len(new) == 101


def test_bounce_reports_table_holds_no_clear_address(hooks: Hooks, runtime: Any) -> None:
    # Given every report posted so far in this module / Then no row holds an address in clear
    from mailer.store.schema import bounce_reports

    assert "email" not in bounce_reports.c
    assert all("@" not in repr(tuple(r)) for r in reports(runtime))


def test_migration_creates_the_table(runtime: Any) -> None:
    # Given the migrated test database / Then bounce_reports exists with its indexes
    from sqlalchemy import inspect

    inspector = inspect(runtime.engine)
    assert "bounce_reports" in inspector.get_table_names()
    names = {i["name"] for i in inspector.get_indexes("bounce_reports")}
    assert {"ix_bounce_reports_source_result", "ix_bounce_reports_source_event"} <= names
