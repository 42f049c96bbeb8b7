"""Micro-benchmark: client CPU per message for the SMTP send step alone.

``python bench/smtp_micro.py [--messages N] [--connections K]`` starts the fast sink
(``mailer.smtp.sink``, which offers PIPELINING) in a subprocess and sends the same
pre-built messages three ways from this process: plain aiosmtplib ``sendmail`` over K
reused connections (the raw blast's client), ``SmtpTransport`` one command at a time
(``pipelining=False``), and ``SmtpTransport`` with RFC 2920 pipelining. It prints msg/s
and this process's CPU microseconds per message for each.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib

from bench.blast import build
from mailer.mail.mime import Envelope
from mailer.smtp.pool import SmtpTransport


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def raw(port: int, envelopes: list[Envelope], connections: int) -> None:
    """aiosmtplib sendmail over reused connections (what bench/blast.py does)."""
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.local")
               for _ in range(connections)]
    for client in clients:
        await client.connect()

    async def lane(client: aiosmtplib.SMTP, share: list[Envelope]) -> None:
        for envelope in share:
            await client.sendmail(envelope.sender, envelope.recipients, envelope.data)

    await asyncio.gather(*(lane(c, envelopes[i::connections]) for i, c in enumerate(clients)))
    for client in clients:
        await client.quit()


def pooled(pipelining: bool) -> Callable[[int, list[Envelope], int], Awaitable[None]]:
    """SmtpTransport's send_many in slices of 16, as the dispatcher calls it."""

    async def run(port: int, envelopes: list[Envelope], connections: int) -> None:
        transport = SmtpTransport("127.0.0.1", port, pool_size=connections,
                                  local_hostname="bench.local", pipelining=pipelining,
                                  max_messages_per_connection=10**9)
        try:
            for start in range(0, len(envelopes), 16 * connections):
                chunk = envelopes[start:start + 16 * connections]
                results = await asyncio.gather(*(
                    transport.send_many(chunk[i:i + 16]) for i in range(0, len(chunk), 16)))
                assert all(r.outcome == "sent" for rs in results for r in rs)
        finally:
            await transport.close()

    return run


def main() -> None:
    """Run the three clients against one fast sink and print a line for each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    port = _free_port()
    root = Path(__file__).resolve().parent.parent
    sink = subprocess.Popen([sys.executable, "-m", "mailer.smtp.sink", "--fast", "--port",
                             str(port)], cwd=root, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the fast sink did not start") from None
                time.sleep(0.05)
        envelopes = build(0, args.messages, "micro")
        clients = [("aiosmtplib sendmail (raw blast client)", raw),
                   ("SmtpTransport, one command at a time", pooled(False)),
                   ("SmtpTransport, pipelined (RFC 2920)", pooled(True))]
        print(f"{args.messages} messages of {len(envelopes[0].data)} bytes, "
              f"{args.connections} connections, fast sink in another process")
        for label, client in clients:
            cpu, wall = time.process_time(), time.perf_counter()
            asyncio.run(client(port, envelopes, args.connections))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"{label:<42} {args.messages / wall:8,.0f} msg/s "
                  f"{cpu / args.messages * 1e6:6.0f} µs CPU/message")
    finally:
        sink.terminate()
        sink.wait(10)


if __name__ == "__main__":
    main()
