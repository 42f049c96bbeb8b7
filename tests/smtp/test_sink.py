"""The capturing dev sink and the fast benchmark sink, driven by real SMTP clients."""

from __future__ import annotations

import asyncio
import re
import select
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiosmtplib

from mailer.smtp.pool import SmtpTransport
from mailer.smtp.replies import Outcome
from mailer.smtp.sink import CapturingHandler, FastSink
from tests.smtp_servers import SimpleEnvelope as Envelope
from tests.smtp_servers import running_smtp_server
from tests.smtp_servers import sample_envelope as message

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\n"
    b"first line\r\n.a line that starts with a dot\r\n..two dots\r\n\r\nlast line\r\n"
)


@contextmanager
def sink_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run ``python -m mailer.smtp.sink ARGS --port 0``; yield the process and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailer.smtp.sink", "--port", "0", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "sink did not start"
        line = proc.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def eml_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.eml"))


# -- the capturing sink ------------------------------------------------------------------


def test_capturing_handler_stores_the_exact_bytes(tmp_path: Path) -> None:
    # Given the capturing handler behind an in-process aiosmtpd server
    with running_smtp_server(handler=CapturingHandler(tmp_path)) as (host, port, _):
        # When aiosmtplib sends a message twice
        for _ in range(2):
            asyncio.run(aiosmtplib.send(MESSAGE, sender="a@example.com",
                                        recipients=["b@example.org"], hostname=host, port=port))
    # Then two .eml files hold byte-identical copies, and no temporary file is left behind
    files = eml_files(tmp_path)
    assert len(files) == 2
    assert all(f.read_bytes() == MESSAGE for f in files)
    assert all(re.fullmatch(r"\d{8}T\d{12}Z-\d{6}\.eml", f.name) for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name for f in files]


def test_python_m_mailer_sink_captures_and_stops_on_sigterm(tmp_path: Path) -> None:
    # Given `python -m mailer.smtp.sink --dir D` running as its own process
    store = tmp_path / "sink"
    with sink_process("--dir", str(store)) as (proc, port):
        # When our transport sends a message to it
        result = asyncio.run(_send_once(port, Envelope("a@example.com", ("b@example.org",),
                                                        MESSAGE)))
        assert result is Outcome.SENT
        # Then the file is there as soon as the 250 came back
        [stored] = eml_files(store)
        assert stored.read_bytes() == MESSAGE
        proc.send_signal(signal.SIGTERM)
        # And SIGTERM ends it cleanly
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        assert "example" not in proc.stderr.read()  # no addresses logged


async def _send_once(port: int, envelope: Envelope) -> Outcome:
    transport = SmtpTransport("127.0.0.1", port)
    try:
        return (await transport.send(envelope)).outcome
    finally:
        await transport.close()


# -- the fast sink -----------------------------------------------------------------------


def test_fast_sink_counts_and_can_store_what_the_pool_sends(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, list[Outcome]]:
        # Given a fast sink that also stores messages
        sink = FastSink(tmp_path)
        server = await sink.start("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = SmtpTransport("127.0.0.1", port, pool_size=4)
        try:
            # When 60 messages are sent over a pool of four
            results = await transport.send_many([message(n) for n in range(60)])
        finally:
            await transport.close()
            server.close()
            await server.wait_closed()
        return sink.count, [r.outcome for r in results]

    count, outcomes = asyncio.run(scenario())
    # Then it counted all 60 and stored them unstuffed, byte for byte
    assert outcomes == [Outcome.SENT] * 60 and count == 60
    stored = sorted(f.read_bytes() for f in eml_files(tmp_path))
    assert stored == sorted(message(n).data for n in range(60))


def test_fast_sink_speaks_enough_smtp_for_smtplib_and_pipelining() -> None:
    async def scenario() -> tuple[int, bytes]:
        # Given a counting-only fast sink
        sink = FastSink()
        server = await sink.start("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            # When smtplib sends one message (EHLO, MAIL, RCPT, DATA, QUIT) ...
            await asyncio.to_thread(_smtplib_send, port)
            # ... and a raw client pipelines a whole transaction (RFC 2920), an empty message,
            # RSET, NOOP, an out-of-order RCPT and an unknown verb
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"EHLO me\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
            writer.write(b"Subject: p\r\n\r\n..dot\r\n.\r\n")
            writer.write(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n.\r\n")
            writer.write(b"RSET\r\nNOOP\r\nRCPT TO:<b@x>\r\nVRFY b\r\nQUIT\r\n")
            replies = await reader.read()
            writer.close()
        finally:
            server.close()
            await server.wait_closed()
        return sink.count, replies

    count, replies = asyncio.run(scenario())
    # Then all three messages were counted and every command got its reply, in order
    assert count == 3
    codes = re.findall(rb"^(\d{3})[ ]", replies, flags=re.MULTILINE)
    assert codes == [b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250",
                     b"250", b"250", b"503", b"502", b"221"]


def _smtplib_send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@example.com", ["b@example.org"], MESSAGE)


def test_fast_sink_process_writes_its_count_to_the_counter_file(tmp_path: Path) -> None:
    # Given `python -m mailer.smtp.sink --fast --counter-file F` as a subprocess, storing nothing
    counter = tmp_path / "count"
    with sink_process("--fast", "--counter-file", str(counter)) as (proc, port):
        # When 25 messages are sent and the sink is stopped
        async def send() -> list[Outcome]:
            transport = SmtpTransport("127.0.0.1", port, pool_size=5)
            try:
                return [r.outcome for r in await transport.send_many(
                    [message(n) for n in range(25)])]
            finally:
                await transport.close()

        assert asyncio.run(send()) == [Outcome.SENT] * 25
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    # Then the counter file holds the final count and no message was stored
    assert counter.read_text() == "25\n"
    assert not list(tmp_path.glob("*.eml"))
