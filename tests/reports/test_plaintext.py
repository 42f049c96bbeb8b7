"""Prose bounces: where the original starts, which layouts name a recipient, who is never one."""

from __future__ import annotations

from mailer.reports import ReportKind, read_report
from mailer.reports.plaintext import read
from mailer.reports.prose import divider

SENDER = "bounces+t2@mail.shop.example"


def bounce(
    body: str, subject: str = "Mail delivery failed", frm: str = "MAILER-DAEMON@mx.example.net"
) -> bytes:
    """A plain-text message from a mail system to our return path."""
    return f"From: {frm}\nTo: {SENDER}\nSubject: {subject}\n\n{body}".encode()


def test_addresses_in_the_returned_original_are_never_recipients() -> None:
    """Given a failure naming one address and a quoted original naming others, then one."""
    report = read_report(
        bounce(
            "The following address failed:\n\n  gone@example.org\n    550 5.1.1 unknown user\n\n"
            "------ This is a copy of the message, including all the headers. ------\n\n"
            "Received: from x\nFrom: news@shop.example\n"
            "To: gone@example.org\nCc: other@example.org\n"
            "Message-ID: <m2@mail.shop.example>\n\nhi other@example.org\n"
        )
    )
    assert [r.address for r in report.recipients] == ["gone@example.org"]
    assert report.recipients[0].hard
    assert report.message_id == "m2@mail.shop.example"


def test_a_run_of_quoted_headers_starts_the_original() -> None:
    """Given no divider line, then three header fields in a row mark the original."""
    text = (
        "Failed:\n<a@example.org>: 550 no such user\n\n"
        "Received: from x\nMessage-ID: <1@y>\nTo: b@example.org\n"
    )
    assert text[divider(text) :].startswith("Received:")


def test_qmail_colon_layout_and_sender_never_named() -> None:
    """Given qmail's "<a@b>:" layout, then the address is named, the report's ends are not."""
    found = read(
        "I'm afraid I wasn't able to deliver your message to the following addresses.\n\n"
        "<x@example.org>:\nSorry, no mailbox here by that name. (#5.1.1)\n",
        {SENDER},
    ).findings
    assert [f.address for f in found] == ["x@example.org"]


def test_smtp_transcript_names_the_recipient_not_the_sender() -> None:
    """Given a transcript with MAIL FROM and RCPT TO, then only the RCPT TO address."""
    report = read_report(
        bounce(
            "----- Transcript of session follows -----\n>>> MAIL From:<news@shop.example>\n"
            "<<< 250 ok\n>>> RCPT To:<t@example.org>\n"
            "<<< 550 5.1.1 <t@example.org>... User unknown\n"
        )
    )
    assert [r.address for r in report.recipients] == ["t@example.org"]


def test_daemons_are_never_recipients() -> None:
    """Given only postmaster and MAILER-DAEMON addresses, then no one is named."""
    report = read_report(
        bounce("Delivery failed. Contact postmaster@example.org or MAILER-DAEMON@example.org.\n")
    )
    assert report.recipients == ()


def test_delay_warning_is_delayed() -> None:
    """Given a warning that delivery continues, then the recipient is delayed, not failed."""
    report = read_report(
        bounce(
            "This is a warning message only.\n"
            "Delivery to the following recipient has been delayed:\n\n"
            "     late@example.org\n\nMessage will be retried for 2 more day(s)\n",
            subject="Delivery Status Notification (Delay)",
        )
    )
    assert report.kind is ReportKind.BOUNCE
    assert [(r.address, r.delayed, r.hard) for r in report.recipients] == [
        ("late@example.org", True, False)
    ]


def test_alias_named_in_expanded_from_wins() -> None:
    """Given Postfix's "(expanded from <alias>)", then the alias we mailed is named."""
    report = read_report(
        bounce(
            "<final@store.example>(expanded from <alias@example.org>): "
            "host x said: 550 5.1.1 no such user\n"
        )
    )
    assert [r.address for r in report.recipients] == ["alias@example.org"]


def test_lone_to_of_returned_original_when_prose_names_no_one() -> None:
    """Given a failure with no address but a returned original to one person, then that one."""
    report = read_report(
        bounce(
            "----- Transcript of session follows -----\n421 Deferred: Connection timed out\n\n"
            "----- Unsent message follows -----\nReceived: by mx\nFrom: news@shop.example\n"
            "To: lone@example.org\nSubject: sale\n\nhi\n",
            subject="Returned mail: Cannot send message for 4 days",
        )
    )
    assert [(r.address, r.hard) for r in report.recipients] == [("lone@example.org", False)]


def test_list_mail_returned_original_names_no_one() -> None:
    """Given a returned discussion-list message (List-Post), then its To (the list) is not named."""
    report = read_report(
        bounce(
            "A message that you sent could not be delivered.\n\n"
            "------ This is a copy of the message's headers. ------\n\nReceived: by mx\n"
            "From: poster@example.org\nTo: list@lists.example.org\n"
            "List-Post: <mailto:list@lists.example.org>\n"
        )
    )
    assert report.recipients == ()
