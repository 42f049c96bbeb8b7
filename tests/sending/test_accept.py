"""Accepting messages: one typed result per request, in order (SPEC 7 bodies unchanged)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from mailer.errors import InvalidAddress, ValidationFailed
from mailer.keys import ApiKey
from mailer.sending.accept import Accepted, Acceptor, Refused, SendRequest
from mailer.sending.queue import ListEnqueuer
from mailer.store.status import MessageStatus
from suppression.policy import Category, Reason
from tests.units import unit_runtime

ADMIN = ApiKey(id=0, name="unit", scopes=frozenset({"admin"}))
CONFIRM = {"name": "Ada", "confirm_url": "https://example.test/c/1"}


def _address() -> str:
    return f"accept-{uuid.uuid4().hex[:10]}@example.org"


def test_each_request_gets_its_own_typed_result_in_order(db_url: str) -> None:
    # Given a batch: a good confirmation, a bad address, a future one, and a repeat of the
    # first address (the one-time rule counts earlier items of the same batch)
    rt = unit_runtime(db_url)
    first = _address()
    requests = [
        SendRequest("registration_confirmation", first, data=CONFIRM),
        SendRequest("registration_confirmation", "not an address", data=CONFIRM),
        SendRequest("registration_confirmation", _address(), data=CONFIRM,
                    send_at=rt.clock() + timedelta(hours=1)),
        SendRequest("registration_confirmation", first, data=CONFIRM),
    ]
    # When it is accepted
    results = Acceptor(rt).accept(ADMIN, requests)
    # Then each result says what became of its request
    queued, bad, later, repeat = results
    assert isinstance(queued, Accepted) and queued.status is MessageStatus.QUEUED
    assert queued.category is Category.REGISTRATION_CONFIRMATION and queued.reason is None
    assert isinstance(bad, Refused) and isinstance(bad.error, InvalidAddress)
    assert isinstance(later, Accepted) and later.status is MessageStatus.SCHEDULED
    assert isinstance(repeat, Accepted)
    assert (repeat.status, repeat.reason) == (MessageStatus.SUPPRESSED, Reason.ALREADY_SENT)
    # And only the queued one was handed to the workers
    assert isinstance(rt.enqueuer, ListEnqueuer)
    assert rt.enqueuer.batches == [([queued.id], None)]


def test_the_json_is_the_spec_body() -> None:
    # Given one result of each kind
    accepted = Accepted("abc", MessageStatus.SUPPRESSED, Category.PROMOTION, Reason.NO_CONSENT)
    refused = Refused(ValidationFailed("unknown topic 'x'", code="unknown_topic"))
    # When they are written as JSON / Then they are the SPEC 7 bodies
    assert accepted.as_json() == {"id": "abc", "status": "suppressed", "category": "promotion",
                                  "reason": "no_consent"}
    assert refused.as_json() == {"error": {"code": "unknown_topic",
                                           "message": "unknown topic 'x'", "details": None}}
    # And a stored result (an idempotency key's) reads back as the same value
    assert Accepted.from_json(accepted.as_json()) == accepted
    queued = Accepted("d", MessageStatus.QUEUED, Category.SERVICE_ALERT)
    assert "reason" not in queued.as_json()
    assert Accepted.from_json(queued.as_json()) == queued


def test_a_repeated_idempotency_key_replays_the_first_result(db_url: str) -> None:
    # Given a message accepted with an idempotency key
    rt = unit_runtime(db_url)
    key = f"idem-{uuid.uuid4().hex}"
    request = SendRequest("registration_confirmation", _address(), data=CONFIRM,
                          idempotency_key=key, body={"to": "x", "n": 1})
    [first] = Acceptor(rt).accept(ADMIN, [request])
    # When the same request comes again, and then another body with the same key
    [again] = Acceptor(rt).accept(ADMIN, [request])
    other = SendRequest("registration_confirmation", _address(), data=CONFIRM,
                        idempotency_key=key, body={"to": "y", "n": 2})
    [conflict] = Acceptor(rt).accept(ADMIN, [other])
    # Then the repeat is the first result, and the other body a 409
    assert isinstance(first, Accepted) and again == first
    assert isinstance(conflict, Refused)
    assert (conflict.error.status, conflict.error.code) == (409, "idempotency_conflict")


def test_a_promotion_needs_a_postal_address(db_url: str) -> None:
    # Given a runtime without MAILER_POSTAL_ADDRESS
    rt = unit_runtime(db_url, MAILER_POSTAL_ADDRESS="")
    # When a promotion is accepted / Then it is refused with the compliance rule's 422
    [result] = Acceptor(rt).accept(ADMIN, [SendRequest(
        "newsletter", _address(), data={"name": "A", "headline": "H", "body": "B"})])
    assert isinstance(result, Refused)
    assert (result.error.status, result.error.code) == (422, "postal_address_missing")
