"""The inbound listener end to end over real SMTP (SPEC 6 VERP, SPEC 12).

Mail is really sent (API, a real worker, a real SMTP relay), then bounces, complaints and
``mailto:`` unsubscribes reach the real aiosmtpd listener through smtplib on loopback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.inbound.world import (
    DOMAIN,
    World,
    corpus,
    inbound_world,
    message_status,
    send_and_wait,
    smtp_send,
    suppression_reasons,
)
from tests.scenarios.test_report_matching import arf_bytes

pytestmark = pytest.mark.db

_VERP = re.compile(rf"^bounces\+[a-z2-7]{{39}}@{re.escape(DOMAIN)}$")


@pytest.fixture(scope="module")
def world(env: dict[str, str], redis_server: Any, smtp_server: Any,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """API, worker and listener configured with MAILER_INBOUND_DOMAIN."""
    with inbound_world(env, redis_server.url, tmp_path_factory.mktemp("inbound")) as made:
        yield made


def test_message_goes_out_with_a_verp_sender_and_a_mailto(
    world: World, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given the inbound domain configured / When a promotion is sent
    sent = send_and_wait(world, keys, smtp_server, promotion=True)
    # Then MAIL FROM is bounces+TOKEN@ the inbound domain, the token short enough for a
    # local part (RFC 5321: 64) and lower-case (some MTAs lower-case local parts)
    assert _VERP.match(sent.mail_from), sent.mail_from
    assert len(sent.mail_from.split("@")[0]) <= 64
    # And it names exactly this message
    from mailer.inbound.addresses import InboundAddresses

    settings = world.runtime.settings
    reader = InboundAddresses.from_keys(DOMAIN, settings.secret_key)
    assert reader.read(sent.mail_from.upper()).message_id == sent.row_id  # type: ignore[union-attr]
    # And List-Unsubscribe offers the https link and the mailto: beside it (RFC 2369)
    value = " ".join(str(sent.headers["List-Unsubscribe"]).split())
    assert re.fullmatch(
        rf"<https://mail\.example\.test/u/[^>]+>, <mailto:unsubscribe\+[a-z2-7]+@"
        rf"{re.escape(DOMAIN)}\?subject=unsubscribe>", value), value


def test_plain_text_bounce_to_the_verp_address_bounces_and_suppresses(
    world: World, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a sent message, and Exim's plain-text bounce from the corpus, which names some
    # other address (the token is the authority, SPEC 12)
    sent = send_and_wait(world, keys, smtp_server)
    bounce = corpus("exim/basic-550-mailbox-unavailable.eml")
    # When it is mailed over SMTP to the message's VERP address
    code, _ = smtp_send(world, sent.mail_from, bounce)
    # Then it is accepted once applied: the message is bounced, the address suppressed
    assert code == 250
    assert message_status(world.runtime, sent.row_id) == "bounced"
    assert suppression_reasons(world.runtime, sent.email) == {"hard_bounce"}


def report_rows(world: World, message_id: str) -> list[tuple[str, str]]:
    """(result, event type) of each report recorded against ``message_id``."""
    from mailer.store.schema import bounce_reports

    with world.runtime.engine.connect() as conn:
        rows = conn.execute(select(bounce_reports.c.result, bounce_reports.c.event_type)
                            .where(bounce_reports.c.message_id == message_id)).all()
    return [(r.result, r.event_type) for r in rows]


def test_soft_bounce_does_not_suppress(
    world: World, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a sent message / When Postfix's "5.2.2 mailbox full" DSN arrives at its VERP
    sent = send_and_wait(world, keys, smtp_server)
    code, _ = smtp_send(world, sent.mail_from, corpus("postfix/dsn-5.2.2-mailbox-full.eml"))
    # Then it is taken and recorded as a soft bounce of that message, suppressing nothing
    assert code == 250
    assert message_status(world.runtime, sent.row_id) == "sent"
    assert suppression_reasons(world.runtime, sent.email) == set()
    assert report_rows(world, sent.row_id) == [("applied", "soft_bounce")]


def test_auto_reply_to_the_verp_address_is_recorded_and_ignored(
    world: World, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a sent message / When an out-of-office reply arrives at its VERP address
    sent = send_and_wait(world, keys, smtp_server)
    code, _ = smtp_send(world, sent.mail_from, corpus("autoreply/sieve-vacation.eml"))
    # Then it is taken, recorded as ignored, and changes nothing
    assert code == 250
    assert message_status(world.runtime, sent.row_id) == "sent"
    assert suppression_reasons(world.runtime, sent.email) == set()
    assert report_rows(world, sent.row_id) == [("ignored", "auto_reply")]


def test_mailto_unsubscribe_revokes_the_topic(
    world: World, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a promotion sent to an opted-in person, with its mailto: unsubscribe
    sent = send_and_wait(world, keys, smtp_server, promotion=True)
    found = re.search(r"<mailto:([^?>]+)\?subject=unsubscribe>",
                      " ".join(str(sent.headers["List-Unsubscribe"]).split()))
    assert found is not None
    # When the person's client mails it, whatever the subject and body (RFC 8058 3.2)
    body = (f"From: {sent.email}\r\nTo: {found.group(1)}\r\nSubject: please stop\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\nremove me\r\n").encode()
    code, _ = smtp_send(world, found.group(1), body, mail_from=sent.email)
    # Then the newsletter is revoked, with source mailto, before the 250
    assert code == 250
    from mailer.store.schema import consent_events, recipients

    with world.runtime.engine.connect() as conn:
        rid = conn.execute(select(recipients.c.id).where(
            recipients.c.external_id == sent.external_id)).scalar_one()
        newest = conn.execute(
            select(consent_events.c.granted, consent_events.c.source)
            .where(consent_events.c.recipient_id == rid, consent_events.c.topic == "newsletter")
            .order_by(consent_events.c.id.desc())).first()
    assert newest is not None and tuple(newest) == (False, "mailto")


def test_arf_to_fbl_marks_the_message_complained(
    world: World, keys: dict[str, str], smtp_server: Any
) -> None:
    # Given a sent message / When a provider's feedback loop sends an ARF report to fbl@
    sent = send_and_wait(world, keys, smtp_server)
    report = arf_bytes([sent.email], sent.message_id, datetime.now(UTC))
    code, _ = smtp_send(world, f"fbl@{DOMAIN}", report, mail_from="fbl@isp.example")
    # Then the message is complained and marketing suppressed for the address
    assert code == 250
    assert message_status(world.runtime, sent.row_id) == "complained"
    assert suppression_reasons(world.runtime, sent.email) == {"complaint"}


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        (f"nobody@{DOMAIN}", b"5.1.1"),
        (f"bounces+{'a' * 39}@{DOMAIN}", b"5.1.1"),  # a forged token
        (f"unsubscribe+{'b' * 30}@{DOMAIN}", b"5.1.1"),
        (f"bounces@{DOMAIN}", b"5.1.1"),
        ("someone@elsewhere.example", b"5.7.1"),  # no relaying
        (f"fbl@{DOMAIN}.evil.example", b"5.7.1"),
    ],
)
def test_unknown_recipients_are_refused(world: World, rcpt: str, reply: bytes) -> None:
    # Given the listener / When RCPT names anything but our four mailboxes
    code, text = smtp_send(world, rcpt, b"Subject: x\r\n\r\nx\r\n")
    # Then it is 550, with 5.1.1 at our domain and 5.7.1 elsewhere
    assert (code, text[:5]) == (550, reply)


def test_postmaster_mail_is_kept_for_a_person(world: World) -> None:
    # Given the listener / When someone writes to postmaster@ (RFC 5321 4.5.1)
    marker = b"please look at your bounce handling"
    code, _ = smtp_send(world, f"postmaster@{DOMAIN}",
                        b"Subject: hello\r\nFrom: admin@isp.example\r\n\r\n" + marker + b"\r\n")
    # Then it is accepted and stored in the postmaster Maildir
    assert code == 250
    stored = [p.read_bytes() for p in Path(world.postmaster_dir, "new").iterdir()]
    assert any(marker in data for data in stored)


def test_message_over_ten_megabytes_is_refused(world: World) -> None:
    # Given a message larger than 10 MB / When sent to a valid mailbox / Then 552
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * (11 * 1024)
    code, _ = smtp_send(world, f"postmaster@{DOMAIN}", big)
    assert code == 552
