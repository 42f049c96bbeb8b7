"""Local SMTP sinks: the capturing dev server (`mailer sink`) and a fast benchmark counter."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from mailer.smtp.sink_view import SinkView

#: Where ``python -m mailer.smtp.sink`` stores messages unless ``--dir`` says otherwise.
DEFAULT_SINK_DIR = Path("var/sink")

#: The fast sink drops a client whose DATA grows past this (it is a benchmark tool).
FAST_SINK_MAX_MESSAGE = 32 * 1024 * 1024

#: How often the fast sink rewrites its counter file while messages arrive.
COUNTER_FILE_INTERVAL = 0.2

_MAX_COMMAND_LINE = 2048  # RFC 5321 section 4.5.3.1.4 allows 512; be lenient, not unbounded
_END_OF_DATA = b"\r\n.\r\n"


class MessageStore:
    """Writes raw messages as ``<timestamp>-<counter>.eml`` files, atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def save(self, data: bytes) -> Path:
        """Store the bytes exactly as given; readers never see a half-written file."""
        with self._lock:
            number = next(self._counter)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        final = self.directory / f"{stamp}-{number:06d}.eml"
        # A dot-prefixed temporary name that does not end in .eml, so a reader globbing
        # *.eml only ever sees complete files; os.replace is atomic on one filesystem.
        temporary = self.directory / f".{final.name}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, final)
        return final


class CapturingHandler:
    """aiosmtpd handler that stores every accepted message as an .eml file and answers 250."""

    def __init__(self, directory: Path) -> None:
        self.store = MessageStore(directory)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Write the DATA bytes as received (CRLF kept, dot-stuffing undone), then reply."""
        # No fsync: this is a development sink, not a relay bound by RFC 5321 section 6.1.
        await asyncio.to_thread(self.store.save, bytes(envelope.original_content))
        return "250 2.0.0 OK stored"


async def _until_signalled() -> None:
    """Wait for SIGINT or SIGTERM (or for cancellation when not on the main thread)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread: the caller stops us by cancelling
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _bound_port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def serve_sink(
    host: str, port: int, directory: Path, view_port: int | None = None
) -> None:
    """Run the capturing sink until SIGINT/SIGTERM or cancellation; with ``view_port``,
    also its read-only web view on that loopback port (0 picks a free one)."""
    handler = CapturingHandler(directory)
    # Bound first: a taken view port stops us before the SMTP port is held.
    view = SinkView(directory, view_port) if view_port is not None else None
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            lambda: SMTP(handler, enable_SMTPUTF8=True, hostname="mailer-sink"), host, port
        )
    except BaseException:
        if view is not None:
            view.stop()
        raise
    print(f"sink listening on {host}:{_bound_port(server)}, storing in {directory}", flush=True)
    if view is not None:
        view.start()
        print(f"sink view on {view.url}", flush=True)
    try:
        await _until_signalled()
    finally:
        server.close()
        if view is not None:
            view.stop()
        await server.wait_closed()


def run_sink(host: str, port: int, directory: Path, view_port: int | None = None) -> None:
    """Run the development capturing SMTP server in the foreground (``mailer sink``)."""
    # aiosmtpd logs envelope addresses at INFO on "mail.log"; our privacy rule forbids it.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_sink(host, port, directory, view_port))


# -- the fast benchmark sink -------------------------------------------------------------


class FastSink:
    """A minimal SMTP responder that counts messages and, given a directory, stores them."""

    def __init__(self, directory: Path | None = None) -> None:
        self.count = 0
        self.store = MessageStore(directory) if directory is not None else None

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen on ``host:port`` (0 picks a free port) and return the asyncio server."""
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _FastSmtpSession(self), host, port)

    def accepted(self, stuffed: bytes) -> None:
        """Count one message; store it with dot-stuffing undone (RFC 5321 section 4.5.2)."""
        self.count += 1
        if self.store is not None:
            data = stuffed.replace(b"\r\n..", b"\r\n.")
            if data.startswith(b".."):
                data = data[1:]
            self.store.save(data)


class _FastSmtpSession(asyncio.Protocol):
    """One client connection: just enough SMTP for aiosmtplib and smtplib clients."""

    def __init__(self, sink: FastSink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_data = False
        self.scan_from = 0
        self.has_sender = False
        self.recipients = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 fast-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies: list[bytes] = []
        closing = self._process(replies)
        if self.transport is not None and not self.transport.is_closing():
            # One write per read, so pipelined commands (RFC 2920) get one reply burst.
            self.transport.write(b"".join(replies))
            if closing:
                self.transport.close()

    def _process(self, replies: list[bytes]) -> bool:
        while True:
            if self.in_data:
                if not self._take_message(replies):
                    if len(self.buffer) > FAST_SINK_MAX_MESSAGE:
                        replies.append(b"552 5.3.4 Message too big\r\n")
                        return True
                    return False
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > _MAX_COMMAND_LINE:
                    replies.append(b"500 5.5.2 Line too long\r\n")
                    return True
                return False
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            if self._command(line, replies):
                return True

    def _take_message(self, replies: list[bytes]) -> bool:
        if self.scan_from == 0 and self.buffer.startswith(b".\r\n"):
            body, rest = b"", 3  # an empty message
        else:
            index = self.buffer.find(_END_OF_DATA, max(self.scan_from - 2, 0))
            if index < 0:
                self.scan_from = max(len(self.buffer) - len(_END_OF_DATA), 0)
                return False
            body, rest = bytes(self.buffer[: index + 2]), index + len(_END_OF_DATA)
        del self.buffer[:rest]
        self.in_data = False
        self.scan_from = 0
        self.has_sender = False
        self.recipients = 0
        self.sink.accepted(body)
        replies.append(b"250 2.0.0 OK queued\r\n")
        return True

    def _command(self, line: bytes, replies: list[bytes]) -> bool:
        verb = line[:4].upper()
        if verb == b"EHLO":
            replies.append(b"250-fast-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        elif verb == b"HELO":
            replies.append(b"250 fast-sink\r\n")
        elif verb == b"MAIL":
            self.has_sender, self.recipients = True, 0
            replies.append(b"250 2.1.0 OK\r\n")
        elif verb == b"RCPT":
            if not self.has_sender:
                replies.append(b"503 5.5.1 Need MAIL first\r\n")
            else:
                self.recipients += 1
                replies.append(b"250 2.1.5 OK\r\n")
        elif verb == b"DATA":
            if not self.recipients:
                replies.append(b"503 5.5.1 Need RCPT first\r\n")
            else:
                self.in_data = True
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            self.has_sender, self.recipients = False, 0
            replies.append(b"250 2.0.0 OK\r\n")
        elif verb == b"NOOP":
            replies.append(b"250 2.0.0 OK\r\n")
        elif verb == b"QUIT":
            replies.append(b"221 2.0.0 Bye\r\n")
            return True
        else:
            replies.append(b"502 5.5.2 Command not implemented\r\n")
        return False


def _write_counter(path: Path, count: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(f"{count}\n")
    os.replace(temporary, path)


async def serve_fast_sink(
    host: str, port: int, counter_file: Path | None = None, directory: Path | None = None
) -> None:
    """Run a :class:`FastSink` until SIGINT/SIGTERM or cancellation, keeping ``counter_file``."""
    sink = FastSink(directory)
    server = await sink.start(host, port)
    print(f"fast sink listening on {host}:{_bound_port(server)}", flush=True)

    async def keep_counter(path: Path) -> None:
        written = -1
        while True:
            if sink.count != written:
                written = sink.count
                _write_counter(path, written)
            await asyncio.sleep(COUNTER_FILE_INTERVAL)

    counter_task = asyncio.create_task(keep_counter(counter_file)) if counter_file else None
    try:
        await _until_signalled()
    finally:
        server.close()
        if counter_task is not None:
            counter_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await counter_task
        if counter_file is not None:
            _write_counter(counter_file, sink.count)  # the final figure, after the last reply


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mailer.smtp.sink``: the capturing sink, or ``--fast`` for benchmarks."""
    parser = argparse.ArgumentParser(prog="python -m mailer.smtp.sink", description=__doc__)
    parser.add_argument("--fast", action="store_true", help="run the fast counting sink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025, help="0 picks a free port")
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"where to store .eml files (default {DEFAULT_SINK_DIR}; "
                             "with --fast, store only when given)")
    parser.add_argument("--counter-file", type=Path, default=None,
                        help="with --fast: keep the message count in this file")
    parser.add_argument("--view-port", type=int, default=None,
                        help="serve the web view of captured mail on this loopback port "
                             "(0 picks a free one)")
    args = parser.parse_args(argv)
    if args.fast:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_fast_sink(args.host, args.port, args.counter_file, args.dir))
    else:
        run_sink(args.host, args.port, args.dir or DEFAULT_SINK_DIR, args.view_port)


if __name__ == "__main__":
    main()
