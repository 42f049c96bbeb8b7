"""Auto-replies are not bounces; bounces marked like auto-replies still are."""

from __future__ import annotations

import pytest

from mailer.reports import ReportKind, read_report


@pytest.mark.parametrize(
    "headers",
    [
        "Auto-Submitted: auto-replied\n",
        "X-Autoreply: yes\n",
        "X-Autorespond: yes\n",
        "Precedence: auto_reply\n",
        "Subject: Out of Office: sale\n",
        "Subject: Automatic reply: sale\n",
    ],
)
def test_auto_reply_signals(headers: str) -> None:
    """Given a person's reply with an auto-reply signal, then it is an auto-reply."""
    subject = "" if headers.startswith("Subject") else "Subject: Re: sale\n"
    raw = (
        f"From: Ann <ann@example.org>\nTo: bounces+t3@mail.shop.example\n{subject}{headers}"
        "In-Reply-To: <m3@mail.shop.example>\n\nThanks for your mail, back on Monday.\n"
    ).encode()
    report = read_report(raw)
    assert report.kind is ReportKind.AUTO_REPLY
    assert report.recipients == ()
    assert report.message_id == "m3@mail.shop.example"


def test_out_of_office_that_quotes_failure_words_is_still_an_auto_reply() -> None:
    """Given an auto-reply saying an old address no longer exists, then no one is named."""
    raw = (
        b"From: Rob <rob@new.example>\nTo: bounces+t4@mail.shop.example\nSubject: Re: sale\n"
        b"Auto-Submitted: auto-replied\n\nMy old address rob@old.example does not exist any more;\n"
        b"mail to it could not be delivered. User unknown there.\n"
    )
    report = read_report(raw)
    assert report.kind is ReportKind.AUTO_REPLY
    assert report.recipients == ()


def test_mta_bounce_with_auto_submitted_is_a_bounce() -> None:
    """Given an MTA bounce carrying Auto-Submitted: auto-replied, then it is a bounce."""
    raw = (
        b"From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\n"
        b"To: bounces+t5@mail.shop.example\n"
        b"Subject: Mail delivery failed: returning message to sender\n"
        b"Auto-Submitted: auto-replied\n"
        b"X-Failed-Recipients: gone@example.org\n\nThe following address(es) failed:\n\n"
        b"  gone@example.org\n    550 5.1.1 User unknown\n"
    )
    report = read_report(raw)
    assert report.kind is ReportKind.BOUNCE
    assert [(r.address, r.hard) for r in report.recipients] == [("gone@example.org", True)]


def test_auto_generated_alone_decides_nothing() -> None:
    """Given Auto-Submitted: auto-generated and no other signal, then it is not an auto-reply."""
    raw = (
        b"From: billing@vendor.example\nTo: bounces+t6@mail.shop.example\nSubject: Invoice 42\n"
        b"Auto-Submitted: auto-generated\n\nYour invoice is attached.\n"
    )
    assert read_report(raw).kind is ReportKind.UNRECOGNISED
