"""The inbound listener killed mid-burst loses nothing it answered 250 to (SPEC 12).

``mailer inbound`` runs as its own process; 500 bounces, each to the VERP address of a
message of ours, are sent over two loopback SMTP connections; the process is SIGKILLed
while they flow. Every bounce it had answered 250 must have its effect in the database.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from tests.conftest import ROOT
from tests.inbound.world import DOMAIN
from tests.services import free_port

pytestmark = pytest.mark.db

#: Bounces in the burst, answered 250 before the kill (at least), and time bounds.
BURST = 500
KILL_AFTER = 150
DEADLINE = 120.0


def _dsn(recipient: str, n: int) -> bytes:
    """A minimal RFC 3464 hard bounce for ``recipient``, unique by its own Message-ID."""
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <kill-{n}-"
        f"{uuid.uuid4().hex}@mx.example.net>\r\nDate: Mon, 01 Jan 2024 00:00:10 +0000\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; '
        'boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n'
        "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net"
        f"\r\n\r\nFinal-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n--B--\r\n"
    ).encode()


def _messages(runtime: Any, count: int) -> list[tuple[str, str]]:
    """``count`` sent message rows of ours: (row id, recipient address)."""
    from mailer.store.schema import messages

    now = runtime.clock()
    made: list[tuple[str, str]] = []
    rows = []
    for _ in range(count):
        row_id, header = runtime.new_message_id()
        address = f"kill-{uuid.uuid4().hex[:12]}@example.org"
        made.append((row_id, address))
        rows.append({"id": row_id, "category": "service_alert", "template": "service_alert",
                     "to_email": address, "to_hash": runtime.address(address).hash,
                     "status": "sent", "attempts": 1, "message_id_header": header,
                     "created_at": now, "updated_at": now, "sent_at": now, "data": {}})
    with runtime.engine.begin() as conn:
        conn.execute(insert(messages), rows)
    return made


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mailer inbound exited at start"
        with (contextlib.suppress(OSError),
              socket.create_connection(("127.0.0.1", port), timeout=1) as sock):
            if sock.recv(64).startswith(b"220"):
                return
        time.sleep(0.05)
    raise AssertionError("mailer inbound did not listen within 30 s")


def test_sigkill_during_a_burst_loses_no_answered_bounce(
    env: dict[str, str], runtime: Any
) -> None:
    from mailer.inbound.addresses import InboundAddresses
    from mailer.store.schema import messages, suppressions

    # Given 500 messages we sent, and `mailer inbound` running as its own process
    sent = _messages(runtime, BURST)
    verp = InboundAddresses.from_keys(DOMAIN, env["MAILER_SECRET_KEY"])
    port = free_port()
    full = {**os.environ, **env, "MAILER_INBOUND_DOMAIN": DOMAIN,
            "MAILER_INBOUND_PORT": str(port), "PYTHONPATH": str(ROOT),
            "MAILER_POSTMASTER_DIR": tempfile.mkdtemp(prefix="mailer-pm-")}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "mailer.cli", "inbound"], cwd=ROOT,
                                env=full, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_listening(port, proc)
            answered: list[str] = []
            lock = threading.Lock()
            stop = threading.Event()

            def blast(share: list[tuple[str, str]]) -> None:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
                    smtp.ehlo("mx.example.net")
                    for n, (row_id, address) in enumerate(share):
                        if stop.is_set():
                            return
                        bounce_to = verp.bounce_address(row_id)
                        assert bounce_to is not None
                        smtp.mail("")
                        smtp.rcpt(bounce_to)
                        code, _ = smtp.data(_dsn(address, n))
                        if code == 250:
                            with lock:
                                answered.append(row_id)

            # When the bounces flow over two connections and the process is SIGKILLed
            # once it has answered KILL_AFTER of them
            threads = [threading.Thread(target=blast, args=(sent[i::2],)) for i in (0, 1)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + DEADLINE
            while len(answered) < KILL_AFTER and time.monotonic() < deadline:
                time.sleep(0.005)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            log.seek(0)
            output = log.read().decode(errors="replace")

    # Then it was killed mid-burst, and every bounce answered 250 had its effect: the
    # message bounced and its address suppressed
    assert KILL_AFTER <= len(answered) < BURST, (len(answered), output[-2000:])
    by_id = dict(sent)
    with runtime.engine.connect() as conn:
        bounced = conn.execute(select(func.count()).select_from(messages).where(
            messages.c.id.in_(answered), messages.c.status == "bounced")).scalar_one()
        hashes = [runtime.address(by_id[i]).hash for i in answered]
        suppressed = conn.execute(select(func.count(func.distinct(suppressions.c.email_hash)))
                                  .where(suppressions.c.email_hash.in_(hashes),
                                         suppressions.c.reason == "hard_bounce")).scalar_one()
    assert (bounced, suppressed) == (len(answered), len(answered))
    # And nothing in the log names an address or a token
    assert "@example.org" not in output and "bounces+" not in output
