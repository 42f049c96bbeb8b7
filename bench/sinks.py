"""The benchmark's SMTP sinks, each in its own process, reporting when messages arrived.

``python bench/sinks.py --kind fast|aiosmtpd --port N --status-file F`` serves on
127.0.0.1 and keeps ``F`` as ``count first last``: the number of messages answered 250 and
the ``time.monotonic()`` of the first and the last (CLOCK_MONOTONIC is system-wide on
Linux, so the driver can subtract its own start time). Neither sink stores anything.
With ``--arrivals A`` it also appends ``<monotonic time> <first recipient>`` to ``A`` for
every message, for latency from acceptance to the 250.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiosmtpd.smtp import SMTP

from mailer.smtp.sink import FastSink

#: How often the status file is rewritten while messages arrive (seconds).
STATUS_INTERVAL = 0.02
# The fast sink sees only the DATA bytes: the recipient comes from the To field.
_TO = re.compile(rb"(?:^|\r\n)To: ((?:[^\r]|\r\n[ \t])*)", re.IGNORECASE)
_ADDRESS = re.compile(rb"<([^<>]+)>\s*$|([^\s<>]+@[^\s<>]+)\s*$")


class Clock:
    """Counts accepted messages and remembers when the first and the last came."""

    def __init__(self, arrivals: bool = False) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        #: ``(time, recipient)`` per message not yet written out, when arrivals are kept.
        self.arrivals: list[tuple[float, str]] | None = [] if arrivals else None

    def tick(self, recipient: str = "") -> None:
        """One message accepted now."""
        now = time.monotonic()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now
        if self.arrivals is not None:
            self.arrivals.append((now, recipient))


def recipient_of(data: bytes) -> str:
    """The address in a message's To field ("" when there is none)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    field = _TO.search(head)
    if field is None:
        return ""
    found = _ADDRESS.search(field.group(1).replace(b"\r\n", b""))
    if found is None:
        return ""
    return (found.group(1) or found.group(2)).decode("ascii", "replace")


class TimedFastSink(FastSink):
    """The project's fast counting sink, with arrival times."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(None)
        self.clock = clock

    def accepted(self, stuffed: bytes) -> None:
        """Count the message and note the time."""
        super().accepted(stuffed)
        self.clock.tick(recipient_of(stuffed) if self.clock.arrivals is not None else "")


class CountingHandler:
    """An aiosmtpd handler that discards each message and answers 250."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Count and discard."""
        self.clock.tick(envelope.rcpt_tos[0] if envelope.rcpt_tos else "")
        return "250 2.0.0 OK"


def read_status(path: Path) -> tuple[int, float, float]:
    """``(count, first, last)`` from a sink's status file; zeros before the first write."""
    try:
        count, first, last = path.read_text().split()
    except (OSError, ValueError):
        return 0, 0.0, 0.0
    return int(count), float(first), float(last)


def _write_status(path: Path, clock: Clock) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(f"{clock.count} {clock.first!r} {clock.last!r}\n")
    os.replace(temporary, path)


def _write_arrivals(path: Path, clock: Clock) -> None:
    if clock.arrivals:
        pending, clock.arrivals = clock.arrivals, []
        with path.open("a") as out:
            out.writelines(f"{when!r} {who}\n" for when, who in pending)


async def serve(kind: str, port: int, status: Path, arrivals: Path | None = None) -> None:
    """Serve until SIGTERM/SIGINT, keeping the status (and arrivals) file current."""
    clock = Clock(arrivals=arrivals is not None)
    loop = asyncio.get_running_loop()
    if kind == "fast":
        server = await TimedFastSink(clock).start("127.0.0.1", port)
    else:
        # aiosmtpd logs envelope addresses at INFO on "mail.log"; keep them out of logs.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        handler = CountingHandler(clock)
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bench-sink"), "127.0.0.1", port
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _write_status(status, clock)
    written = 0
    while not stop.is_set():
        if clock.count != written:
            written = clock.count
            if arrivals is not None:
                _write_arrivals(arrivals, clock)  # first, so the count never runs ahead
            _write_status(status, clock)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_INTERVAL)
    server.close()
    if arrivals is not None:
        _write_arrivals(arrivals, clock)
    _write_status(status, clock)


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=("fast", "aiosmtpd"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status-file", type=Path, required=True)
    parser.add_argument("--arrivals", type=Path, help="append '<time> <recipient>' per message")
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.status_file, args.arrivals))


if __name__ == "__main__":
    main()
