"""Feedback-loop reports (RFC 5965): kinds, recipients, redaction."""

from __future__ import annotations

import pytest

from mailer.reports import ReportKind, read_report
from mailer.reports.arf import redacted


def arf(
    feedback: str, rcpt: str = "Original-Rcpt-To: <p@isp.example>\n", to: str = "p@isp.example"
) -> bytes:
    """A minimal ARF report with one feedback type."""
    return (
        "From: fbl@isp.example\nTo: fbl@shop.example\nSubject: FW: sale\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="A"\n\n'
        "--A\nContent-Type: text/plain\n\nAbuse report.\n\n"
        f"--A\nContent-Type: message/feedback-report\n\nFeedback-Type: {feedback}\nVersion: 1\n"
        f"Original-Mail-From: <bounces+t9@mail.shop.example>\n{rcpt}\n"
        f"--A\nContent-Type: text/rfc822-headers\n\nFrom: news@shop.example\nTo: {to}\n"
        "Message-ID: <m9@mail.shop.example>\n\n--A--\n"
    ).encode()


@pytest.mark.parametrize(
    ("feedback", "kind"),
    [
        ("abuse", ReportKind.COMPLAINT),
        ("fraud", ReportKind.COMPLAINT),
        ("other", ReportKind.COMPLAINT),
        ("some-future-type", ReportKind.COMPLAINT),
        ("opt-out", ReportKind.UNSUBSCRIBE),
        ("virus", ReportKind.UNRECOGNISED),
        ("not-spam", ReportKind.UNRECOGNISED),
        ("auth-failure", ReportKind.UNRECOGNISED),
    ],
)
def test_feedback_type_decides_the_kind(feedback: str, kind: ReportKind) -> None:
    """Given a Feedback-Type, then the report is of the matching kind."""
    report = read_report(arf(feedback))
    assert report.kind is kind
    assert report.feedback_type == feedback
    assert report.message_id == "m9@mail.shop.example"
    if kind is not ReportKind.UNRECOGNISED:
        assert [r.address for r in report.recipients] == ["p@isp.example"]
        assert report.bounce_address == "bounces+t9@mail.shop.example"


def test_redacted_recipient_relies_on_message_id() -> None:
    """Given a redacted Original-Rcpt-To and To, then no one is named but the id is kept."""
    report = read_report(
        arf("abuse", "Original-Rcpt-To: redacted@isp.example\n", "redacted@isp.example")
    )
    assert report.kind is ReportKind.COMPLAINT
    assert report.recipients == ()
    assert report.message_id == "m9@mail.shop.example"


def test_missing_rcpt_field_falls_back_to_the_lone_to() -> None:
    """Given no Original-Rcpt-To, then the returned original's single To names the person."""
    report = read_report(arf("abuse", "", "q@isp.example"))
    assert [r.address for r in report.recipients] == ["q@isp.example"]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("redacted@isp.example", True),
        ("xxxxxxx@isp.example", True),
        ("****@isp.example", True),
        ("0123456789abcdef0123456789abcdef@isp.example", True),
        ("alex@isp.example", False),
        ("max.x@isp.example", False),
    ],
)
def test_redaction_is_recognised(address: str, expected: bool) -> None:
    """Given a placeholder local part, then it is seen as redacted (RFC 6590)."""
    assert redacted(address) is expected
