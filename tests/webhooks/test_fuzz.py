"""Hostile input: mutated reports and payloads may only ever raise ParseError."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.reports.vocabulary import WebhookEvent
from mailer.webhooks import dsn, handle, mailgun, postmark, sendgrid, ses
from mailer.webhooks._support.config import WebhookConfig
from mailer.webhooks._support.errors import ParseError, VerificationFailed
from tests.mutations import mutated
from tests.webhooks.conftest import NOW
from tests.webhooks.signing import fixture_bytes, fixture_json

REPORTS = [fixture_bytes(name) for name in ("dsn.eml", "arf.eml", "arf_redacted.eml")]

# Fragments that steer mutations into the parser's interesting corners: boundaries,
# part types, transfer encodings, RFC 2231 and RFC 2047 values, bad dates, odd addresses.
FRAGMENTS = [
    b"\r\n", b"\r\n\r\n", b"--BOUNDARY", b"--ARF", b"--BOUNDARY--", b";", b"\x00", b"\xff\xfe",
    b"Content-Type: message/rfc822\r\n", b"Content-Type: message/delivery-status\r\n",
    b"Content-Type: message/global-delivery-status\r\n", b"Content-Type: text/rfc822-headers\r\n",
    b"Content-Type: message/feedback-report\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n", b"=?utf-8?q?=FF?=",
    b"report-type*=utf-8''delivery-status", b"report-type*0=feedback; report-type*1=-report",
    b"Action: failed\r\n", b"Status: 5.7.1\r\n", b"Status: 9.99999.1\r\n",
    b"Final-Recipient: utf-8; a\\x{D800}b\\x{110000}@x\r\n", b"Original-Rcpt-To: <>\r\n",
    b"Feedback-Type: abuse\r\n", b"Date: Mon, 99 Foo 99999 99:99:99 +9999\r\n",
    b"Date: Mon, 01 Jan 10000 00:00:00 +0000\r\n", b"Last-Attempt-Date: 1 Jan 1 0:0:0 -9999\r\n",
]


HEADERS = st.dictionaries(st.text(max_size=30), st.text(max_size=60), max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=mutated(REPORTS, FRAGMENTS, cut=60, copy=300, noise=12), headers=HEADERS)
def test_mutated_reports_only_ever_raise_parse_error(body: bytes, headers: dict[str, str]) -> None:
    # Given a mutated DSN/ARF and random request headers
    # When it is parsed / Then it yields events or raises ParseError, never anything else
    try:
        events = dsn.parse(headers, body)
    except ParseError:
        return
    assert all(isinstance(event, WebhookEvent) for event in events)


@settings(max_examples=50, deadline=None)
@given(
    body=mutated(REPORTS, FRAGMENTS, cut=60, copy=300, noise=12),
    headers=HEADERS,
    token=st.one_of(st.just("the-right-token"), st.text(max_size=40)),
)
def test_dsn_handle_refuses_or_parses(body: bytes, headers: dict[str, str], token: str) -> None:
    # Given random headers plus the right or a random bearer token on a mutated report
    headers = dict(headers, Authorization=f"Bearer {token}")
    config = WebhookConfig(dsn_token="the-right-token")
    # When handled / Then only 400 or 401 errors come out, never a crash
    with contextlib.suppress(ParseError, VerificationFailed):
        handle(dsn, headers, body, config, NOW)


JSON_FIXTURES = [
    (sendgrid, "sendgrid_events.json"),
    (mailgun, "mailgun_failed_permanent.json"),
    (mailgun, "mailgun_failed_temporary.json"),
    (mailgun, "mailgun_delivered.json"),
    (postmark, "postmark_bounce.json"),
    (postmark, "postmark_delivery.json"),
    (postmark, "postmark_subscription_change.json"),
    (ses, "ses_bounce.json"),
    (ses, "ses_complaint.json"),
    (ses, "ses_delivery_delay.json"),
]
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.none(), max_size=2),
    st.sampled_from(
        ["5.7.1", "Permanent", "failed", "HardBounce", "2024-13-45T99:00:00Z", "\ud800"]
    ),
)


@st.composite
def mutated_payload(draw: st.DrawFn) -> tuple[Any, bytes]:
    """A provider fixture with some values replaced by odd ones or removed."""
    module, name = draw(st.sampled_from(JSON_FIXTURES))

    def mutate(value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                choice = draw(st.integers(0, 19))
                if choice == 0:
                    continue
                out[key] = draw(ODD_VALUES) if choice == 1 else mutate(item)
            return out
        if isinstance(value, list):
            return [mutate(item) for item in value]
        return value

    payload = mutate(fixture_json(name))
    if module is ses:
        envelope = fixture_json("sns_notification.json")
        envelope["Message"] = json.dumps(payload)
        payload = envelope
    return module, json.dumps(payload).encode()


@settings(max_examples=200, deadline=None)
@given(case=mutated_payload())
def test_mutated_provider_payloads_only_ever_raise_parse_error(case: tuple[Any, bytes]) -> None:
    # Given a provider payload with values swapped for odd types or removed
    module, body = case
    # When parsed / Then events or ParseError, never a TypeError or KeyError
    try:
        result = module.parse({}, body)
    except ParseError:
        return
    assert isinstance(result, list | ses.SnsSubscription)
