"""From raw report to records: what is unread is kept for an operator, without addresses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select

from mailer.reports.excerpt import excerpt, mask
from tests.conftest import ROOT

#: A message no reader understands: a human reply to the bounce address.
UNREAD = (
    b"From: Kim Example <kim.private@isp.example>\r\nTo: bounces@example.test\r\n"
    b"Subject: re: your mail to kim.private@isp.example\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nX-Mailer: Home-made MTA 0.1\r\n"
    b"Content-Type: multipart/mixed; boundary=Q\r\n\r\n--Q\r\nContent-Type: text/plain\r\n\r\n"
    b"SECRET BODY TEXT kim.private@isp.example\r\n--Q--\r\n"
)


def test_excerpt_keeps_structure_and_headers_but_no_body_or_mailbox() -> None:
    # Given a message the reader cannot read / When excerpted
    found = excerpt(UNREAD)
    # Then its MIME structure and header fields are kept, every local part masked, and
    # nothing of the body
    assert found.structure == "multipart/mixed >text/plain"
    assert "X-Mailer: Home-made MTA 0.1" in found.headers
    assert "*@isp.example" in found.headers
    assert "kim.private" not in found.headers and "SECRET" not in found.headers
    assert mask("a.b+c@x.example, <d@y.example>") == "*@x.example, <*@y.example>"


def test_unrecognised_report_is_recorded_and_listed(
    db_url: str, runtime: Any, client: Any, env: dict[str, str]
) -> None:
    from mailer.store.schema import unrecognised_reports

    with runtime.engine.begin() as conn:
        conn.execute(delete(unrecognised_reports))
    # Given the DSN webhook / When our MTA posts mail nobody can read, twice
    headers = {"Authorization": f"Bearer {env['MAILER_DSN_WEBHOOK_TOKEN']}"}
    first = client.post("/webhooks/dsn", content=UNREAD, headers=headers)
    again = client.post("/webhooks/dsn", content=UNREAD, headers=headers)
    # Then it is accepted, counted unrecognised once, and one excerpt is kept
    assert first.status_code == 200 and first.json()["unrecognised"] == 1
    assert again.json()["duplicates"] == 1
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(unrecognised_reports)).all()
    assert [(r.source, r.reader) for r in rows] == [("dsn", "none")]
    # And `mailer bounces unrecognised` shows it, without the mailbox or the body
    done = subprocess.run(
        [sys.executable, "-m", "mailer.cli", "bounces", "unrecognised"], cwd=ROOT, text=True,
        capture_output=True, timeout=60, env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "X-Mailer: Home-made MTA 0.1" in done.stdout
    assert "multipart/mixed >text/plain" in done.stdout
    assert "kim.private" not in done.stdout and "SECRET" not in done.stdout


def test_old_excerpts_are_pruned(db_url: str, runtime: Any) -> None:
    from mailer.reports.intake import EXCERPT_RETENTION, ReportIntake
    from mailer.store.schema import unrecognised_reports

    # Given an excerpt older than the retention period
    now = runtime.clock()
    with runtime.engine.begin() as conn:
        conn.execute(delete(unrecognised_reports))
        conn.execute(unrecognised_reports.insert().values(
            source="dsn", reader="none", size=1, structure="text/plain", headers="",
            received_at=now - EXCERPT_RETENTION - timedelta(hours=1)))
    # When another unreadable report arrives
    ReportIntake(runtime).take(UNREAD.replace(b"Home-made", b"Other"), source="dsn")
    # Then only the new excerpt remains
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(unrecognised_reports.c.headers)).all()
    assert len(rows) == 1 and "Other MTA" in rows[0].headers


def test_auto_reply_posted_to_the_webhook_is_recorded_as_ignored(
    db_url: str, runtime: Any, client: Any, env: dict[str, str]
) -> None:
    from mailer.store.schema import bounce_reports

    # Given an out-of-office reply forwarded by our MTA
    body = (ROOT / "tests/fixtures/bounces/autoreply/sieve-vacation.eml").read_bytes()
    headers = {"Authorization": f"Bearer {env['MAILER_DSN_WEBHOOK_TOKEN']}"}
    # When posted twice
    r = client.post("/webhooks/dsn", content=body, headers=headers)
    client.post("/webhooks/dsn", content=body, headers=headers)
    # Then nothing is applied, and one ignored row records it
    assert r.json() == {"applied": 0, "duplicates": 0, "unmatched": 0, "unrecognised": 0}
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(bounce_reports.c.result, bounce_reports.c.event_type).where(
            bounce_reports.c.result == "ignored", bounce_reports.c.source == "dsn")).all()
    assert [tuple(r) for r in rows] == [("ignored", "auto_reply")]


def test_inbound_command_idles_without_a_domain(env: dict[str, str]) -> None:
    # Given no MAILER_INBOUND_DOMAIN / When `mailer inbound` starts
    full = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailer.cli", "inbound"], cwd=ROOT, text=True,
        env={**full, **env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        # Then it stays up, says why it is idle, and stops cleanly on SIGTERM (SPEC 11)
        time.sleep(3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "MAILER_INBOUND_DOMAIN is not set" in out
