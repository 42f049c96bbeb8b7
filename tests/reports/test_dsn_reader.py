"""RFC 3464 delivery-status fields: which address, which action, which status."""

from __future__ import annotations

from mailer.reports import ReportKind, read_report
from mailer.reports.dsn import parse_fields, recipient_of


def dsn(*blocks: str, per_message: str = "Reporting-MTA: dns; mx.example.org\n") -> bytes:
    """A minimal multipart/report carrying ``blocks`` as its per-recipient fields."""
    fields = per_message + "\n" + "\n".join(blocks)
    return (
        "From: MAILER-DAEMON@mx.example.org\nTo: bounces+t1@mail.shop.example\n"
        "Subject: Delivery Status Notification\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nFailed.\n\n"
        f"--B\nContent-Type: message/delivery-status\n\n{fields}\n"
        "--B\nContent-Type: text/rfc822-headers\n\nMessage-ID: <m1@mail.shop.example>\n"
        "To: a@example.org\n\n--B--\n"
    ).encode()


def test_original_recipient_wins_over_final_recipient() -> None:
    """Given both fields, when read, then the address we mailed (Original) is reported."""
    report = read_report(
        dsn(
            "Original-Recipient: rfc822;alias@example.org\n"
            "Final-Recipient: rfc822;real@mailstore.example.org\nAction: failed\nStatus: 5.1.1\n"
        )
    )
    assert [r.address for r in report.recipients] == ["alias@example.org"]
    assert report.recipients[0].hard
    assert report.message_id == "m1@mail.shop.example"


def test_non_rfc822_types_are_skipped() -> None:
    """Given x400 and unknown address types only, then no one is named."""
    report = read_report(
        dsn(
            "Final-Recipient: x400; /G=A/S=B/C=DE/\nAction: failed\nStatus: 5.1.1\n",
            "Final-Recipient: unknown; local-user\nAction: failed\nStatus: 5.1.1\n",
        )
    )
    assert report.kind is ReportKind.UNRECOGNISED
    assert report.recipients == ()


def test_x400_original_gives_way_to_rfc822_final() -> None:
    """Given a non-rfc822 Original-Recipient, then the rfc822 Final-Recipient is used."""
    report = read_report(
        dsn(
            "Original-Recipient: x400; /G=A/C=DE/\nFinal-Recipient: rfc822; b@example.org\n"
            "Action: failed\nStatus: 5.1.1\n"
        )
    )
    assert [r.address for r in report.recipients] == ["b@example.org"]


def test_unknown_actions_are_read_by_status() -> None:
    """Given home-made Action values, then 5.x.x fails, 4.x.x is soft, 2.x.x is nothing."""
    record = {"final-recipient": "rfc822; c@example.org"}
    hard = recipient_of({**record, "action": "failure", "status": "5.1.1"})
    soft = recipient_of({**record, "action": "retrying", "status": "4.3.2"})
    none = recipient_of({**record, "action": "done", "status": "2.0.0"})
    missing = recipient_of({**record, "status": "5.2.1"})
    assert hard is not None and hard.hard
    assert soft is not None and not soft.hard and not soft.delayed
    assert none is None
    assert missing is not None and missing.hard


def test_delivered_relayed_and_expanded_are_no_failures() -> None:
    """Given success actions, then they name no recipient."""
    for action in ("delivered", "relayed", "expanded"):
        record = {"final-recipient": "rfc822; d@example.org", "action": action, "status": "5.0.0"}
        assert recipient_of(record) is None


def test_delayed_is_soft_and_flagged() -> None:
    """Given Action: delayed, then the recipient is a delay warning, never hard."""
    found = recipient_of(
        {"final-recipient": "rfc822; e@example.org", "action": "delayed", "status": "4.4.7"}
    )
    assert found is not None and found.delayed and not found.hard and found.status == "4.4.7"


def test_failed_with_success_status_is_soft() -> None:
    """Given "failed" with 2.0.0, then it is counted but never hard."""
    found = recipient_of(
        {"final-recipient": "rfc822; f@example.org", "action": "failed", "status": "2.0.0"}
    )
    assert found is not None and not found.hard and not found.policy


def test_generic_status_gives_way_to_specific_policy_code() -> None:
    """Given Status 5.0.0 and a 5.7.1 policy diagnostic, then it is a policy refusal."""
    found = recipient_of(
        {
            "final-recipient": "rfc822; g@example.org",
            "action": "failed",
            "status": "5.0.0",
            "diagnostic-code": "smtp; 550 5.7.1 rejected by DMARC policy",
        }
    )
    assert found is not None and found.policy and not found.hard and found.status == "5.7.1"


def test_fields_without_blank_lines_still_split_per_recipient() -> None:
    """Given two recipients in one block, then both records come out."""
    per_message, records = parse_fields(
        "Reporting-MTA: dns; mx\nFinal-Recipient: rfc822; a@x.example\nAction: failed\n"
        "Status: 5.1.1\nFinal-Recipient: rfc822; b@x.example\nAction: delayed\nStatus: 4.4.1\n"
    )
    assert per_message == {"reporting-mta": "dns; mx"}
    assert [r["final-recipient"] for r in records] == ["rfc822; a@x.example", "rfc822; b@x.example"]


def test_folded_diagnostic_is_unfolded() -> None:
    """Given a folded Diagnostic-Code, then its continuation is part of the text."""
    _, records = parse_fields(
        "Final-Recipient: rfc822; a@x.example\nAction: failed\nStatus: 5.7.1\n"
        "Diagnostic-Code: smtp; 550 5.7.1 <a@x.example>: Recipient address\n"
        "    rejected: User unknown\n"
    )
    assert records[0]["diagnostic-code"].endswith("rejected: User unknown")
    found = recipient_of(records[0])
    assert found is not None and found.hard


def test_utf8_address_type_is_decoded() -> None:
    """Given an RFC 6533 utf-8 address with \\x{} escapes, then it is decoded."""
    found = recipient_of(
        {
            "original-recipient": "utf-8; j\\x{00FC}rgen@example.de",
            "action": "failed",
            "status": "5.1.1",
        }
    )
    assert found is not None and found.address == "jürgen@example.de"


def test_envelope_id_and_x_failed_recipients() -> None:
    """Given ENVID and an extra X-Failed-Recipients address, then both are reported."""
    raw = dsn(
        "Final-Recipient: rfc822; h@example.org\nAction: failed\nStatus: 5.1.1\n",
        per_message="Reporting-MTA: dns; mx\nOriginal-Envelope-Id: env-123\n",
    ).replace(b"Subject:", b"X-Failed-Recipients: i@example.org\nSubject:")
    report = read_report(raw)
    assert report.envelope_id == "env-123"
    assert sorted(r.address for r in report.recipients) == ["h@example.org", "i@example.org"]


def test_recipients_are_capped() -> None:
    """Given 3000 recipient blocks, then at most 1000 are reported."""
    blocks = [
        f"Final-Recipient: rfc822; u{i}@example.org\nAction: failed\nStatus: 5.1.1\n"
        for i in range(3000)
    ]
    report = read_report(dsn(*blocks))
    assert len(report.recipients) == 1000
