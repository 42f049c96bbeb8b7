"""Worker CPU per campaign message, in one process, with and without render reuse.

``python bench/render_reuse.py [--recipients N] [--rounds R] [--no-dkim]`` seeds a fresh
SQLite database with N opted-in readers (bench/campaign.py's seeding), fans the
benchmark's newsletter campaign out with the scheduler's job, then runs the worker's
send procedure (``Dispatcher.run``, 100 ids a chunk as the fan-out enqueues them) on
every message, once rendering each message in full and once filling the campaign's
stencil (mailer/mail/stencil.py). SMTP is replaced by a transport that answers 250 at
once, so the figure is the worker's own CPU: claim, decide, render, MIME, DKIM (on by
default, RSA-2048), record. Both variants run on the same rows, reset to ``queued``
between rounds, alternating; the best round of each is printed, and the two variants'
messages are compared byte for byte apart from their Date and MIME boundary.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import update

from bench import campaign as bench_campaign
from bench import content
from bench.pipeline import SECRET
from bench.procs import ROOT
from mailer.mail.mime import Envelope
from mailer.smtp.replies import Outcome, SendResult
from mailer.store.db import upgrade
from mailer.store.schema import messages

#: Ids per queue message, as the fan-out enqueues them.
CHUNK = 100


class Collect:
    """Stands in for the broker: keeps the ids the fan-out enqueues."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def enqueue(self, ids: Sequence[str], delay_ms: int = 0) -> None:
        """Keep them."""
        self.ids.extend(ids)


class Answer250:
    """Stands in for SMTP: every message accepted at once; keeps the last round's bytes."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def send_many(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        """Accept them all."""
        self.data.extend(e.data for e in envelopes)
        return [SendResult(Outcome.SENT, 250, "2.0.0 Ok") for _ in envelopes]


def _environment(work: Path, dkim: bool) -> None:
    templates = content.lay_templates(ROOT / "templates", work / "templates")
    os.environ.update({
        "MAILER_ENV": "production", "MAILER_SECRET_KEY": SECRET,
        "MAILER_DATABASE_URL": f"sqlite:///{work / 'mailer.db'}",
        "MAILER_REDIS_URL": "redis://127.0.0.1:1/0", "MAILER_SMTP_HOST": "127.0.0.1",
        "MAILER_FROM": content.MAIL_FROM, "MAILER_PUBLIC_URL": "https://mail.example.test",
        "MAILER_POSTAL_ADDRESS": "Example Ltd, 1 Example Street, 00000 Example City",
        "MAILER_TEMPLATES_DIR": str(templates),
    })
    if dkim:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (work / "dkim.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.environ.update({"MAILER_DKIM_DOMAIN": "example.test", "MAILER_DKIM_SELECTOR": "s1",
                           "MAILER_DKIM_PRIVATE_KEY_FILE": str(work / "dkim.pem")})


_VARYING = re.compile(rb"^Date: .*$|=_[0-9a-f]{32}|^DKIM-Signature:.*?(?=^\S)",
                      re.MULTILINE | re.DOTALL)


def main() -> None:
    """Seed, fan out, and time both variants."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipients", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-dkim", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailer-bench-reuse-") as tmp:
        work = Path(tmp)
        _environment(work, not args.no_dkim)
        url = os.environ["MAILER_DATABASE_URL"]
        upgrade(url)
        bench_campaign._seed(url, SECRET, args.recipients)
        # Imported after the environment is set: Settings reads it.
        from mailer.campaigns import lifecycle
        from mailer.campaigns.tick import tick
        from mailer.config import Settings
        from mailer.mail.dkim import DkimSigner
        from mailer.mail.mime import MessageBuilder
        from mailer.runtime import Runtime
        from mailer.sending.dispatch import Dispatcher

        settings = Settings.from_environ()
        queue = Collect()
        rt = Runtime.from_settings(settings, queue)  # type: ignore[arg-type]
        shared = {k: v for k, v in content.data(0).items() if k != "name"}
        with rt.engine.begin() as conn:
            lifecycle.create(conn, lifecycle.NewCampaign(
                name="bench", template=content.CAMPAIGN_TEMPLATE, topic="newsletter",
                send_at=rt.clock(), data=shared), None, rt.clock())
        for _ in range(1000):  # bounded: each tick writes a batch or finishes
            if not tick(rt, budget=timedelta(seconds=30)).written:
                break
        ids = list(queue.ids)
        builder = MessageBuilder(settings.mail_from, settings.reply_to,
                                 DkimSigner.from_settings(settings))
        best: dict[bool, float] = {}
        bodies: dict[bool, list[bytes]] = {}
        for _ in range(args.rounds):
            for reuse in (False, True):
                with rt.engine.begin() as conn:
                    conn.execute(update(messages).where(messages.c.id.in_(ids))
                                 .values(status="queued", attempts=0, lease_until=None))
                transport = Answer250()
                dispatcher = Dispatcher(rt, transport, builder, reuse_renders=reuse)
                started = time.process_time()
                for at in range(0, len(ids), CHUNK):
                    dispatcher.run(ids[at:at + CHUNK])
                per = (time.process_time() - started) / len(ids) * 1e6
                best[reuse] = min(best.get(reuse, per), per)
                bodies[reuse] = transport.data
        same = [_VARYING.sub(b"", a) for a in bodies[False]] == [
            _VARYING.sub(b"", b) for b in bodies[True]]
        dkim = "off" if args.no_dkim else "RSA-2048"
        print(f"{len(ids)} campaign messages, DKIM {dkim}, best of {args.rounds} rounds "
              "(CPU time of this process per message):")
        print(f"  full render per message   {best[False]:7.0f} us")
        print(f"  stencil, filled per message {best[True]:5.0f} us "
              f"({best[True] / best[False]:.2f}x)")
        print(f"  messages identical apart from Date, boundary and signature: {same}")
        if not same:
            raise SystemExit("the two variants built different messages")


if __name__ == "__main__":
    main()
