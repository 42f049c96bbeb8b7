"""Hostile input: any bytes give a Report, within bounded work, never an exception."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.reports import MAX_RECIPIENTS, Report, ReportKind, read_report
from tests.mutations import mutated
from tests.reports.corpus import load_cases

SAMPLES = [case.raw() for case in load_cases() if case.raw()][:60]

# Fragments that steer mutations into the readers' corners: boundaries, part types,
# transfer encodings, status fields, odd addresses, divider lines, line ends.
FRAGMENTS = [
    b"\r\n",
    b"\r",
    b"\n\n",
    b"--BOUNDARY",
    b"--RPT",
    b"--RPT--",
    b";",
    b"\x00",
    b"\xff\xfe",
    b"Content-Type: multipart/report; boundary=RPT\n",
    b"Content-Type: message/delivery-status\n",
    b"Content-Type: message/rfc822\n",
    b"Content-Type: message/feedback-report\n",
    b"Content-Type: text/rfc822-headers\n",
    b"Content-Transfer-Encoding: base64\n",
    b"Content-Transfer-Encoding: quoted-printable\n",
    b"Final-Recipient: rfc822; a@b.example\n",
    b"Original-Recipient: utf-8; \\x{D800}@x\n",
    b"Action: failed\n",
    b"Action: \n",
    b"Status: 5.7.1\n",
    b"Status: 9.99999.1\n",
    b"Feedback-Type: abuse\n",
    b"Original-Rcpt-To: <>\n",
    b"X-Failed-Recipients: ,,,@,\n",
    b"------ This is a copy of the message",
    b"<x@y.example>: 550 5.1.1 user unknown\n",
    b"RCPT TO:<" + b"a" * 300 + b"@b.example>\n",
    b"=?utf-8?q?=FF?=",
    b"@" * 50,
    b"." * 200,
]


def assert_sane(report: Report) -> None:
    """A report's invariants, whatever the input."""
    assert isinstance(report, Report)
    assert len(report.recipients) <= MAX_RECIPIENTS
    for recipient in report.recipients:
        assert "@" in recipient.address
        assert not (recipient.hard and (recipient.policy or recipient.delayed))
        assert recipient.diagnostic is None or len(recipient.diagnostic) <= 500
    if report.kind in (ReportKind.AUTO_REPLY, ReportKind.UNRECOGNISED):
        assert report.recipients == ()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SAMPLES, FRAGMENTS))
def test_mutated_reports_never_raise(raw: bytes) -> None:
    """Given a mutated real report, then a sane Report comes back."""
    assert_sane(read_report(raw))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    """Given arbitrary bytes, then a sane Report comes back."""
    assert_sane(read_report(raw))


def timed(raw: bytes) -> tuple[Report, float]:
    """Read ``raw`` and return the report and the seconds it took."""
    start = time.perf_counter()
    report = read_report(raw)
    return report, time.perf_counter() - start


def test_pathological_inputs_are_bounded() -> None:
    """Given deep nesting, huge lines, floods of addresses and fields, then fast and sane."""
    nested = b"".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n".encode() for i in range(3000)
    )
    flood = b"From: MAILER-DAEMON@x.example\nSubject: failure notice\n\n" + b"".join(
        f"<u{i}@example.org>: 550 5.1.1 no such user\n".encode() for i in range(20000)
    )
    fields = (
        b"Content-Type: message/delivery-status\n\n"
        + b"Final-Recipient: rfc822; a@b.example\nAction: failed\nStatus: 5.1.1\n" * 50000
    )
    long_line = b"From: MAILER-DAEMON@x.example\n\n" + b"a@" * 2_000_000
    backtrack = b"From: MAILER-DAEMON@x.example\n\n" + (b"a." * 100_000) + b"@" + b"b-" * 100_000
    headers = b"".join(f"X-H{i}: {'v' * 50}\n".encode() for i in range(50000)) + b"\nbody"
    for raw in (nested, flood, fields, long_line, backtrack, headers, b"\r" * 1_000_000):
        report, seconds = timed(raw)
        assert_sane(report)
        assert seconds < 10, seconds
