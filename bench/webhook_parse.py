"""Measure webhook parsing speed: fixtures and 1 MB hostile inputs (prints, never asserts).

Run from the project root: ``python -m bench.webhook_parse``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from mailer.webhooks import ParseError, dsn, mailgun, postmark, sendgrid

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "webhooks" / "fixtures"
MB = 1024 * 1024


def _time(parse: Callable[[], object], repeat: int) -> tuple[float, str]:
    """Return the median seconds of ``repeat`` runs and what the parse produced."""
    samples = []
    outcome = ""
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            result = parse()
            outcome = f"{len(result) if isinstance(result, list) else 1} event(s)"
        except ParseError as exc:
            outcome = f"ParseError: {exc}"
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), outcome


def _cases() -> list[tuple[str, Callable[[], object], int]]:
    dsn_eml = (FIXTURES / "dsn.eml").read_bytes()
    arf_eml = (FIXTURES / "arf.eml").read_bytes()
    line = b"A" * 76 + b"\r\n"
    block = b"Final-Recipient: rfc822; r@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
    big_attachment = dsn_eml.replace(
        b"Message-ID: <msg-42@example.com>\r\n",
        b"Message-ID: <msg-42@example.com>\r\n\r\n" + line * (MB // len(line)),
    )
    many_blocks = dsn_eml.replace(
        b"Final-Recipient: rfc822; full@example.org",
        block * (MB // len(block)) + b"Final-Recipient: rfc822; full@example.org",
    )
    huge_header = dsn_eml.replace(b"Subject: Undelivered", b"Subject: " + b"x" * MB)
    junk = bytes(range(256)) * (MB // 256)
    events = json.loads((FIXTURES / "sendgrid_events.json").read_bytes())
    sendgrid_1mb = json.dumps(events * (MB // len(json.dumps(events)))).encode()
    mailgun_body = (FIXTURES / "mailgun_failed_permanent.json").read_bytes()
    postmark_body = (FIXTURES / "postmark_bounce.json").read_bytes()
    return [
        ("dsn.eml", lambda: dsn.parse({}, dsn_eml), 200),
        ("arf.eml", lambda: dsn.parse({}, arf_eml), 200),
        ("dsn, 1 MB attached original", lambda: dsn.parse({}, big_attachment), 5),
        ("dsn, 1 MB of recipient blocks", lambda: dsn.parse({}, many_blocks), 5),
        ("dsn, 1 MB header field", lambda: dsn.parse({}, huge_header), 5),
        ("dsn, 1 MB binary junk", lambda: dsn.parse({}, junk), 5),
        ("sendgrid, 1 MB batch", lambda: sendgrid.parse({}, sendgrid_1mb), 5),
        ("mailgun event", lambda: mailgun.parse({}, mailgun_body), 200),
        ("postmark bounce", lambda: postmark.parse({}, postmark_body), 200),
    ]


def main() -> None:
    """Print the median parse time of each case."""
    for name, parse, repeat in _cases():
        seconds, outcome = _time(parse, repeat)
        print(f"{name:34} {seconds * 1000:9.2f} ms   {outcome}")


if __name__ == "__main__":
    main()
