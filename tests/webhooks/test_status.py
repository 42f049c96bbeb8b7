"""Status classification (RFC 3463 enhanced codes, RFC 5321 reply codes): a table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from mailer.reports.vocabulary import EventType, WebhookEvent, stable_event_id
from mailer.webhooks._support.status import classify_status, find_enhanced

HARD, SOFT, DELIVERED = EventType.HARD_BOUNCE, EventType.SOFT_BOUNCE, EventType.DELIVERED


@pytest.mark.parametrize(
    ("code", "diagnostic", "expected"),
    [
        # enhanced code given directly
        ("5.1.1", None, (HARD, "5.1.1", False)),
        ("5.1.10", None, (HARD, "5.1.10", False)),
        ("4.2.2", None, (SOFT, "4.2.2", False)),
        ("2.0.0", None, (DELIVERED, "2.0.0", False)),
        # 5.7.x: still a hard bounce, but flagged as the sender's problem (SPEC 4)
        ("5.7.1", None, (HARD, "5.7.1", True)),
        ("5.7.26", None, (HARD, "5.7.26", True)),
        # 4.7.x: a transient policy deferral is flagged too
        ("4.7.0", None, (SOFT, "4.7.0", True)),
        # RFC 3463: X.2.2 mailbox full is transient even when sent as 5.2.2; X.3/X.4 soft
        ("5.2.2", None, (SOFT, "5.2.2", False)),
        ("5.3.0", None, (SOFT, "5.3.0", False)),
        ("5.4.4", None, (SOFT, "5.4.4", False)),
        ("5.2.1", None, (HARD, "5.2.1", False)),
        # enhanced code found in the diagnostic text
        (None, "smtp; 550 5.1.1 user unknown", (HARD, "5.1.1", False)),
        (None, "smtp;550-5.7.1 blocked by policy", (HARD, "5.7.1", True)),
        ("550", "550 5.1.1 <a@b>: Recipient address rejected", (HARD, "5.1.1", False)),
        # an enhanced code in ``code`` wins over the diagnostic's
        ("5.0.0", "smtp; 550 5.1.1 user unknown", (HARD, "5.0.0", False)),
        # only a basic reply code
        (None, "smtp; 550 user unknown", (HARD, None, False)),
        ("550", None, (HARD, None, False)),
        ("452", "mailbox full", (SOFT, None, False)),
        (None, "250 ok", (DELIVERED, None, False)),
        # nothing readable: counted as soft, never an immediate suppression
        (None, None, (SOFT, None, False)),
        ("", "", (SOFT, None, False)),
        (None, "connection from 192.0.2.1 refused after 550 seconds", (SOFT, None, False)),
    ],
)
def test_classify_status(
    code: str | None, diagnostic: str | None, expected: tuple[EventType, str | None, bool]
) -> None:
    # Given a status code and diagnostic / When classified / Then the table holds
    assert classify_status(code, diagnostic) == expected


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("relay 192.0.2.1 said 5.1.1", "5.1.1"),
        ("version 1.5.1.1 of the server", None),
        ("ip 10.4.2.1", None),
        ("ends with 4.2.2.", "4.2.2"),
        ("5.01.001 padded", "5.1.1"),
        ("3.1.1 not a class", None),
    ],
)
def test_find_enhanced_ignores_lookalikes(text: str, found: str | None) -> None:
    # Given free text / When searched / Then only a real class.subject.detail is taken
    assert find_enhanced(text) == found


def test_event_cleans_its_fields() -> None:
    # Given an event built with bracketed ids, a long folded diagnostic and a +02:00 time
    event = WebhookEvent(
        provider="p", event_id="e", type=EventType.HARD_BOUNCE, recipient=" <a@example.org> ",
        occurred_at=datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2))),
        message_id=" <m@example.com> ", diagnostic="x\r\n  y" + "z" * 600,
    )
    # Then brackets are gone, the time is UTC and the diagnostic is one line of 500 chars
    assert event.recipient == "a@example.org"
    assert event.message_id == "m@example.com"
    assert event.occurred_at == datetime(2024, 1, 1, tzinfo=UTC)
    assert event.occurred_at.tzinfo is UTC
    assert event.diagnostic is not None and event.diagnostic.startswith("x yzzz")
    assert len(event.diagnostic) == 500


def test_event_refuses_naive_times() -> None:
    # Given a naive datetime / When an event is built / Then it is refused
    with pytest.raises(ValueError):
        WebhookEvent(provider="p", event_id="e", type=EventType.DELIVERED, recipient=None,
                     occurred_at=datetime(2024, 1, 1))


def test_stable_event_id_separates_parts() -> None:
    # Given parts that concatenate to the same text / Then their ids differ, and repeat
    assert stable_event_id("ab", "c") != stable_event_id("a", "bc")
    assert stable_event_id("a", None) == stable_event_id("a", None)
