"""MAILER_MAX_ATTEMPTS stops a message that keeps killing its worker or keeps failing
for its recipient, but never one our own relay holds back (SPEC 5)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select

from mailer.mail.mime import Envelope, MessageBuilder
from mailer.runtime import Runtime
from mailer.sending.dispatch import Dispatcher
from mailer.smtp.replies import Outcome as SmtpOutcome
from mailer.smtp.replies import SendResult
from mailer.store.outbox import claim, insert_messages
from mailer.store.schema import messages
from mailer.store.status import MessageStatus as S
from tests.units import message_row, unit_runtime

#: What a relay answers when it will not take mail from us (wrong credentials).
RELAY_REFUSES_US = SendResult(SmtpOutcome.DEFERRED, 535, "5.7.8 Authentication failed",
                              relay_error=True)
#: A recipient's server that is busy: a transient failure for this recipient.
MAILBOX_BUSY = SendResult(SmtpOutcome.DEFERRED, 452, "4.2.2 Mailbox full")


class Relay:
    """Answers every message with ``result`` and counts the attempts that reached it."""

    def __init__(self, result: SendResult) -> None:
        self.result = result
        self.calls = 0

    def send_many(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        """The same answer for each."""
        self.calls += len(envelopes)
        return [self.result for _ in envelopes]


def _one_message(db_url: str) -> tuple[Runtime, list[datetime], str]:
    rt = unit_runtime(db_url, MAILER_MAX_ATTEMPTS="8")
    clock = [rt.clock()]
    rt.clock = lambda: clock[0]
    row = message_row(rt, S.QUEUED, clock[0], to_email="attempts@example.org",
                      data={"name": "A", "confirm_url": "https://example.test/c"})
    with rt.engine.begin() as conn:
        insert_messages(conn, [row], clock[0])
    return rt, clock, row["id"]


def _state(rt: Runtime, message_id: str) -> tuple[str, str | None, int, datetime | None]:
    with rt.engine.connect() as conn:
        r = conn.execute(select(messages.c.status, messages.c.reason, messages.c.attempts,
                                messages.c.next_attempt_at)
                         .where(messages.c.id == message_id)).one()
    return r.status, r.reason, r.attempts, r.next_attempt_at


def _dispatcher(rt: Runtime, relay: Relay) -> Dispatcher:
    return Dispatcher(rt, relay, MessageBuilder(rt.settings.mail_from, None))


def test_a_relay_that_refuses_us_for_hours_does_not_use_up_the_attempts(db_url: str) -> None:
    # Given a message and a relay that refuses our credentials on every attempt
    rt, clock, message_id = _one_message(db_url)
    relay = Relay(RELAY_REFUSES_US)
    delays: list[timedelta] = []
    # When the worker retries it 14 times, each time its retry time comes
    for _ in range(14):
        _dispatcher(rt, relay).run([message_id])
        status, reason, attempts, next_at = _state(rt, message_id)
        # Then it stays deferred for the relay, below the cap, never failed
        assert (status, reason) == (S.DEFERRED, "relay_error")
        assert attempts <= 7
        assert next_at is not None
        delays.append(next_at - clock[0])
        clock[0] = next_at + timedelta(seconds=1)
    # And every attempt reached the relay, waiting longer each time up to about an hour
    assert relay.calls == 14
    assert delays[0] < timedelta(minutes=1) and delays[-1] > timedelta(minutes=45)


def test_a_message_that_keeps_killing_its_worker_is_failed_after_the_cap(db_url: str) -> None:
    # Given a message whose worker dies after every claim, 8 times (the lease runs out)
    rt, clock, message_id = _one_message(db_url)
    for _ in range(8):
        with rt.engine.begin() as conn:
            assert len(claim(conn, [message_id], clock[0], rt.settings.send_lease)) == 1
        clock[0] += rt.settings.send_lease + timedelta(seconds=1)
    relay = Relay(RELAY_REFUSES_US)
    # When a worker claims it a ninth time
    _dispatcher(rt, relay).run([message_id])
    # Then it is failed without another try
    assert _state(rt, message_id)[:2] == (S.FAILED, "too_many_attempts")
    assert relay.calls == 0


def test_a_recipient_that_keeps_failing_uses_up_the_attempts(db_url: str) -> None:
    # Given a message whose recipient's mailbox is full on every attempt
    rt, clock, message_id = _one_message(db_url)
    relay = Relay(MAILBOX_BUSY)
    # When the worker retries it as often as it comes due (bounded)
    for _ in range(12):
        _dispatcher(rt, relay).run([message_id])
        status, _, _, next_at = _state(rt, message_id)
        if status != S.DEFERRED:
            break
        assert next_at is not None
        clock[0] = next_at + timedelta(seconds=1)
    # Then after 8 attempts at the recipient it is failed, as MAILER_MAX_ATTEMPTS says
    assert _state(rt, message_id)[:3] == (S.FAILED, "too_many_attempts", 9)
    assert relay.calls == 8
