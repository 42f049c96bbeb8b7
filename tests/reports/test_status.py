"""Hard, soft or policy: the table of SPEC section 4's rule."""

from __future__ import annotations

import pytest

from mailer.reports.status import classify

# (status field, diagnostic text, hard, policy)
TABLE = [
    ("5.1.1", "550 5.1.1 user unknown", True, False),
    ("5.1.10", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", True, False),
    ("5.2.1", "550 5.2.1 mailbox disabled", True, False),
    ("5.0.0", "550 No such user here", True, False),
    (None, "550 Requested action not taken: mailbox unavailable", True, False),
    ("5.7.1", "550 5.7.1 <a@b.example>: Recipient address rejected: User unknown", True, False),
    ("5.7.1", "550 5.7.1 no such user", True, False),
    (
        "5.7.1",
        "554 5.7.1 Service unavailable; Client host blocked using zen.spamhaus.org",
        False,
        True,
    ),
    ("5.7.26", "550 5.7.26 fails to pass SPF and DKIM checks", False, True),
    ("5.0.0", "550 5.7.1 Message refused by DMARC policy", False, True),
    ("5.1.8", "553 5.1.8 Domain of sender address does not exist", False, True),
    (None, "550 Unroutable sender address", False, True),
    ("5.2.2", "552 5.2.2 Mailbox full", False, False),
    (None, "552 Message for <a@b.example> would exceed mailbox quota", False, False),
    ("5.3.4", "552 5.3.4 Message size exceeds fixed limit", False, False),
    ("5.4.4", "550 5.4.4 Unable to route", False, False),
    ("4.2.2", "452 4.2.2 The recipient's inbox is out of storage space", False, False),
    ("4.1.1", "450 4.1.1 user unknown, try again later", False, False),
    ("4.7.1", "421 4.7.1 rate limited", False, True),
    (None, "retry timeout exceeded", False, False),
    (None, "This is a permanent error; I've given up.", False, False),
    (None, "Sorry, no mailbox here by that name.", True, False),
    (None, "User some.name (a@b.example) not listed in Domino Directory", True, False),
    (None, "The recipient name is not recognized", True, False),
    (None, "the group may not exist, or you may not have permission to post", False, False),
    (None, "Connection timed out", False, False),
    (None, "", False, False),
]


@pytest.mark.parametrize(("status", "text", "hard", "policy"), TABLE)
def test_classification(status: str | None, text: str, hard: bool, policy: bool) -> None:
    """Given a status and its prose, then hard only with evidence, policy never hard."""
    verdict = classify(status, text)
    assert (verdict.hard, verdict.policy) == (hard, policy)
    assert not (verdict.hard and verdict.policy)


def test_status_is_reported_most_specific_first() -> None:
    """Given 5.0.0 and a 5.1.1 in the text, then 5.1.1 is the status."""
    assert classify("5.0.0", "550 5.1.1 unknown").status == "5.1.1"
    assert classify("5.1.1", "550 5.7.1 whatever").status == "5.1.1"


def test_codes_inside_addresses_and_versions_are_not_statuses() -> None:
    """Given numbers in an IP address or a version, then no status is read from them."""
    assert classify(None, "host [192.0.2.250] Exim 4.96 1.5.1.1").status is None
    assert not classify(None, "connection to 192.0.2.250 lost").hard
