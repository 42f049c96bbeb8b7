"""Measure the inbound path: bounces per second through ``mailer inbound``, and the reader.

Run from the project root: ``python -m bench.inbound [--count N] [--connections C]``.
It makes a throw-away SQLite database (or uses ``--database-url``), inserts N sent message
rows, starts ``mailer inbound`` as its own process on a free loopback port, and sends one
RFC 3464 hard bounce to each message's VERP address over C SMTP connections; every 250
means the effect was committed. Then it times :func:`mailer.reports.read_report` over the
labelled corpus. Prints, never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, insert, select

from mailer.config import Settings
from mailer.inbound.addresses import InboundAddresses
from mailer.reports import read_report
from mailer.runtime import Runtime
from mailer.store.db import upgrade
from mailer.store.schema import messages

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "bounces"
DOMAIN = "in.bench.test"
SECRET = "bench-secret-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dsn(recipient: str) -> bytes:
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
        f"Subject: Undelivered Mail\r\nMessage-ID: <{uuid.uuid4().hex}@mx.example.net>\r\n"
        "Date: Mon, 01 Jan 2024 00:00:10 +0000\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n--B\r\n"
        "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n--B--\r\n"
    ).encode()


def listener(count: int, connections: int, database_url: str | None) -> None:
    """Time ``count`` bounces through a ``mailer inbound`` subprocess."""
    tmp = Path(tempfile.mkdtemp(prefix="mailer-bench-inbound-"))
    url = database_url or f"sqlite:///{tmp / 'bench.db'}"
    upgrade(url)
    port = _free_port()
    env = {"MAILER_ENV": "test", "MAILER_SECRET_KEY": SECRET, "MAILER_DATABASE_URL": url,
           "MAILER_INBOUND_DOMAIN": DOMAIN, "MAILER_INBOUND_PORT": str(port),
           "MAILER_POSTMASTER_DIR": str(tmp / "postmaster")}
    rt = Runtime.from_settings(Settings.from_environ(env))
    now = datetime.now(UTC)
    made: list[tuple[str, str]] = []
    rows = []
    for _ in range(count):
        row_id, header = rt.new_message_id()
        address = f"bench-{uuid.uuid4().hex[:12]}@example.org"
        made.append((row_id, address))
        rows.append({"id": row_id, "category": "service_alert", "template": "service_alert",
                     "to_email": address, "to_hash": rt.address(address).hash, "status": "sent",
                     "attempts": 1, "message_id_header": header, "created_at": now,
                     "updated_at": now, "sent_at": now, "data": {}})
    with rt.engine.begin() as conn:
        conn.execute(insert(messages), rows)
    verp = InboundAddresses.from_keys(DOMAIN, SECRET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailer.cli", "inbound"], cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        answered = [0] * connections

        def blast(index: int) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                smtp.ehlo("mx.example.net")
                for row_id, address in made[index::connections]:
                    bounce_to = verp.bounce_address(row_id)
                    assert bounce_to is not None
                    smtp.mail("")
                    smtp.rcpt(bounce_to)
                    if smtp.data(_dsn(address))[0] == 250:
                        answered[index] += 1

        threads = [threading.Thread(target=blast, args=(i,)) for i in range(connections)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    with rt.engine.connect() as conn:
        bounced = conn.execute(select(func.count()).select_from(messages)
                               .where(messages.c.status == "bounced")).scalar_one()
    kind = url.split(":", 1)[0]
    print(f"listener ({kind}, {connections} connections): {sum(answered)}/{count} answered 250 "
          f"in {elapsed:.2f} s = {sum(answered) / elapsed:.0f} bounces/s; "
          f"{bounced} messages bounced in the database")


def reader(repeat: int) -> None:
    """Median microseconds of read_report per message over the corpus."""
    files = sorted(p for p in CORPUS.rglob("*.eml"))
    raws = [p.read_bytes() for p in files]
    per_round = []
    for _ in range(repeat):
        start = time.perf_counter()
        for raw in raws:
            read_report(raw)
        per_round.append((time.perf_counter() - start) / len(raws))
    samples = []
    for raw in raws:
        start = time.perf_counter()
        read_report(raw)
        samples.append(time.perf_counter() - start)
    mean = statistics.median(per_round) * 1e6
    print(f"reader: {len(raws)} corpus messages, {mean:.0f} us/message over the corpus; "
          f"per message median {statistics.median(samples) * 1e6:.0f} us, "
          f"max {max(samples) * 1e6:.0f} us")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", help="default: a throw-away SQLite file")
    args = parser.parse_args()
    reader(args.repeat)
    listener(args.count, args.connections, args.database_url)


if __name__ == "__main__":
    main()
