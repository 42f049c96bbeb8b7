"""The naive peer: what a user would hand-roll with dramatiq, jinja2 and aiosmtplib.

One queue message per email; the actor renders HTML and text with jinja2 (templates
compiled once), builds an ``email.message.EmailMessage`` and hands it to aiosmtplib's
``send_message`` over a connection each worker thread keeps open (kinder to the peer than
a connection per message, which would halve it). No database, no policy check.

Worker: ``dramatiq bench.naive_peer`` with ``BENCH_REDIS_URL``, ``BENCH_SMTP_PORT`` set.
Producer: ``python -m bench.naive_peer produce --label L --count N --ready R --go G``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import dramatiq
import jinja2
from dramatiq.brokers.redis import RedisBroker

from bench import content

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)

_HTML_ENV = jinja2.Environment(autoescape=True)
_TEXT_ENV = jinja2.Environment(autoescape=False)
_SUBJECT = _TEXT_ENV.from_string(content.SUBJECT)
_HTML = _HTML_ENV.from_string(content.HTML)
_TEXT = _TEXT_ENV.from_string(content.TEXT)
_local = threading.local()
#: How long a timed producer lingers after its last enqueue, waiting to be stopped (seconds).
LINGER = 300.0


def _client() -> tuple[asyncio.AbstractEventLoop, aiosmtplib.SMTP]:
    """This thread's event loop and open SMTP connection."""
    loop: asyncio.AbstractEventLoop | None = getattr(_local, "loop", None)
    smtp: aiosmtplib.SMTP | None = getattr(_local, "smtp", None)
    if loop is None:
        loop = asyncio.new_event_loop()
        _local.loop = loop
    if smtp is None or not smtp.is_connected:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=int(os.environ["BENCH_SMTP_PORT"]),
                               local_hostname="bench.local", timeout=30)
        loop.run_until_complete(smtp.connect())
        _local.smtp = smtp
    return loop, smtp


@dramatiq.actor(queue_name="naive", max_retries=0)
def send_email(to: str, data: dict[str, Any]) -> None:
    """Render, build and send one email."""
    message = EmailMessage()
    message["From"] = content.MAIL_FROM
    message["To"] = to
    message["Subject"] = _SUBJECT.render(data)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain="example.test")
    message.set_content(_TEXT.render(data))
    message.add_alternative(_HTML.render(data), subtype="html")
    loop, smtp = _client()
    loop.run_until_complete(smtp.send_message(message))


def produce(label: str, count: int, ready: Path | None, go: Path | None) -> None:
    """Enqueue ``count`` emails one by one, as the application would."""
    payloads = [(content.address(label, i), content.data(i)) for i in range(count)]
    if ready is not None and go is not None:
        ready.write_text("ready\n")
        deadline = time.monotonic() + 120
        while not go.exists():
            if time.monotonic() > deadline:
                raise SystemExit("no go signal")
            time.sleep(0.005)
    for to, data in payloads:
        send_email.send(to, data)
    if go is not None:
        # Stay alive (bounded) so the driver can read this process's CPU time; it stops us.
        time.sleep(LINGER)


def main() -> None:
    """``produce``: enqueue emails for the naive workers."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("produce",))
    parser.add_argument("--label", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--go", type=Path)
    args = parser.parse_args()
    produce(args.label, args.count, args.ready, args.go)


if __name__ == "__main__":
    main()
