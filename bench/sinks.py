"""The benchmark's SMTP sinks, each in its own process, reporting when messages arrived.

``python bench/sinks.py --kind fast|aiosmtpd --port N --status-file F`` serves on
127.0.0.1 and keeps ``F`` as ``count first last``: the number of messages answered 250 and
the ``time.monotonic()`` of the first and the last (CLOCK_MONOTONIC is system-wide on
Linux, so the driver can subtract its own start time). Neither sink stores anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
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


class Clock:
    """Counts accepted messages and remembers when the first and the last came."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def tick(self) -> None:
        """One message accepted now."""
        now = time.monotonic()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now


class TimedFastSink(FastSink):
    """The project's fast counting sink, with arrival times."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(None)
        self.clock = clock

    def accepted(self, stuffed: bytes) -> None:
        """Count the message and note the time."""
        super().accepted(stuffed)
        self.clock.tick()


class CountingHandler:
    """An aiosmtpd handler that discards each message and answers 250."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Count and discard."""
        self.clock.tick()
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


async def serve(kind: str, port: int, status: Path) -> None:
    """Serve until SIGTERM/SIGINT, keeping the status file current."""
    clock = Clock()
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
            _write_status(status, clock)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_INTERVAL)
    server.close()
    _write_status(status, clock)


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=("fast", "aiosmtpd"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status-file", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.kind, args.port, args.status_file))


if __name__ == "__main__":
    main()
