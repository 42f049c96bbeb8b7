"""The ceiling: pre-built messages blasted with raw aiosmtplib over reused connections.

``python bench/blast.py --port N --first I --count C --connections K --ready R --go G``
renders and builds its messages (with the project's MessageBuilder, so the bytes match the
pipeline's), opens ``K`` connections, writes ``R`` and waits for ``G`` to appear; then each
connection sends its share with plain ``sendmail`` and the process exits. No database, no
queue, no policy: the most this client library and this sink allow on this machine.

With ``--dkim-key FILE`` each message is also DKIM-signed (rsa-sha256, the project's
DkimSigner) as it is sent, inside the timed window: the ceiling of any pipeline that signs
every message with that key, using this client library and this sink.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib

from bench import content
from mailer.mail.dkim import DkimSigner
from mailer.mail.mime import Envelope, MessageBuilder
from mailer.mail.templates import Template
from suppression.policy import Category

#: How long the blaster waits for the go signal before giving up (seconds).
GO_TIMEOUT = 120.0
#: How long the blaster lingers after its last message, waiting to be stopped (seconds).
LINGER = 300.0


def build(first: int, count: int, label: str) -> list[Envelope]:
    """The messages, rendered and serialised before the clock starts."""
    template = Template(content.TEMPLATE, Category.SERVICE_ALERT, None, content.SUBJECT,
                        content.HTML)
    builder = MessageBuilder(content.MAIL_FROM, None)
    now = datetime.now(UTC)
    envelopes = []
    for i in range(first, first + count):
        rendered = template.render(content.data(i))
        envelopes.append(builder.build(
            to_email=content.address(label, i), to_name=None, subject=rendered.subject,
            html=rendered.html, text=rendered.text, message_id=f"<blast{i}.{label}@example.test>",
            date=now,
        ))
    return envelopes


async def blast(port: int, envelopes: list[Envelope], connections: int, ready: Path,
                go: Path, signer: DkimSigner | None = None) -> None:
    """Connect, signal readiness, wait for go, send everything."""
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.local",
                               timeout=60) for _ in range(connections)]
    for client in clients:
        await client.connect()
        await client.ehlo()
    ready.write_text("ready\n")
    deadline = time.monotonic() + GO_TIMEOUT
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        await asyncio.sleep(0.005)

    async def lane(client: aiosmtplib.SMTP, share: list[Envelope]) -> None:
        for envelope in share:
            data = envelope.data
            if signer is not None:
                data = signer.signature_header(data) + data
            await client.sendmail(envelope.sender, envelope.recipients, data)

    await asyncio.gather(*(lane(c, envelopes[i::connections]) for i, c in enumerate(clients)))
    for client in clients:
        await client.quit()
    # Stay alive (bounded) so the driver can read this process's CPU time; it stops us.
    await asyncio.sleep(LINGER)


def main() -> None:
    """Parse the command line and blast."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--label", default="blast")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--dkim-key", type=Path,
                        help="PEM RSA key: sign each message as it is sent, as the deployment does")
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--go", type=Path, required=True)
    args = parser.parse_args()
    envelopes = build(args.first, args.count, args.label)
    signer = (DkimSigner(content.DKIM_DOMAIN, content.DKIM_SELECTOR, args.dkim_key.read_bytes())
              if args.dkim_key else None)
    if args.uvloop:
        # Optional: uvloop is not a project dependency (pip install uvloop to measure it).
        uvloop = importlib.import_module("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(blast(args.port, envelopes, args.connections, args.ready, args.go,
                      signer))


if __name__ == "__main__":
    main()
