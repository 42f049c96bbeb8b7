"""The bounce mailbox over IMAP, against a real Dovecot (SPEC 12).

Mail is really sent with VERP senders; the reports then land in a Dovecot mailbox as a
hosted provider would deliver them (``Delivered-To`` naming our address), and the poller
processes them exactly as the SMTP listener does, then moves or deletes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.imap_server import ImapServer, running_imap_server
from tests.inbound.world import (
    DOMAIN,
    World,
    corpus,
    inbound_world,
    message_status,
    send_and_wait,
    suppression_reasons,
)
from tests.scenarios.test_report_matching import arf_bytes

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def world(env: dict[str, str], redis_server: Any, smtp_server: Any,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """API, worker and listener configured with MAILER_INBOUND_DOMAIN."""
    with inbound_world(env, redis_server.url, tmp_path_factory.mktemp("imap")) as made:
        yield made


@pytest.fixture()
def imap() -> Iterator[ImapServer]:
    """A fresh private Dovecot with an empty mailbox."""
    with running_imap_server() as server:
        yield server


def delivered_to(address: str, raw: bytes) -> bytes:
    """``raw`` as a mailbox provider stores it: with the envelope recipient on top."""
    return f"Delivered-To: {address}\r\n".encode() + raw.replace(b"\r\n", b"\n").replace(
        b"\n", b"\r\n")


def test_poll_processes_each_message_as_the_listener_would_and_moves_it(
    world: World, keys: dict[str, str], smtp_server: Any, imap: ImapServer
) -> None:
    from mailer.inbound.imap import BouncePoller

    # Given two sent messages; a plain-text bounce delivered to the first one's VERP
    # address, an ARF complaint about the second delivered to fbl@, and an auto-reply
    bounced = send_and_wait(world, keys, smtp_server)
    complained = send_and_wait(world, keys, smtp_server)
    imap.append(delivered_to(bounced.mail_from, corpus("exim/basic-550-mailbox-unavailable.eml")))
    arf = arf_bytes([complained.email], complained.message_id, datetime.now(UTC))
    imap.append(delivered_to(f"fbl@{DOMAIN}", arf))
    imap.append(delivered_to(bounced.mail_from, corpus("autoreply/out-of-office-crlf.eml")))
    # When the mailbox is polled once
    report = BouncePoller(world.runtime, url=imap.url()).poll()
    # Then all three were processed: bounced, complained, and the auto-reply ignored
    assert (report.seen, report.processed, report.failed) == (3, 3, 0), report.lines
    assert message_status(world.runtime, bounced.row_id) == "bounced"
    assert suppression_reasons(world.runtime, bounced.email) == {"hard_bounce"}
    assert message_status(world.runtime, complained.row_id) == "complained"
    # And they were moved to INBOX.processed, leaving the folder empty
    assert (imap.count("INBOX"), imap.count("INBOX.processed")) == (0, 3)
    # And a second poll finds nothing
    assert BouncePoller(world.runtime, url=imap.url()).poll().seen == 0


def test_poll_with_delete_removes_processed_messages(
    world: World, keys: dict[str, str], smtp_server: Any, imap: ImapServer
) -> None:
    from mailer.inbound.imap import BouncePoller

    # Given a bounce in the mailbox / When polled with ?delete=true
    sent = send_and_wait(world, keys, smtp_server)
    imap.append(delivered_to(sent.mail_from, corpus("exim/basic-550-mailbox-unavailable.eml")))
    report = BouncePoller(world.runtime, url=imap.url(query="delete=true")).poll()
    # Then it is applied and deleted, no processed folder made
    assert report.processed == 1
    assert message_status(world.runtime, sent.row_id) == "bounced"
    assert (imap.count("INBOX"), imap.count("INBOX.processed")) == (0, 0)


def test_bounces_poll_command_prints_what_it_found(
    world: World, keys: dict[str, str], smtp_server: Any, imap: ImapServer
) -> None:
    # Given a soft bounce in the mailbox
    sent = send_and_wait(world, keys, smtp_server)
    imap.append(delivered_to(sent.mail_from, corpus("postfix/dsn-5.2.2-mailbox-full.eml")))
    # When `mailer bounces poll` runs
    done = subprocess.run(
        [sys.executable, "-m", "mailer.cli", "bounces", "poll"], cwd=ROOT, capture_output=True,
        env={**os.environ, **world.env, "MAILER_BOUNCE_IMAP_URL": imap.url(),
             "PYTHONPATH": str(ROOT)}, timeout=60, check=False)
    # Then it prints one line per message and a total, without addresses
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "1 messages: 1 processed, 0 failed (bounces 1)" in out
    assert "soft_bounce" not in out or "applied=1" in out
    assert sent.email not in out and "@" not in out
    assert message_status(world.runtime, sent.row_id) == "sent"
