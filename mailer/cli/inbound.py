"""``mailer inbound`` and ``mailer bounces``: inbound mail (SPEC 12)."""

from __future__ import annotations

import argparse
import logging
import sys

from mailer.cli.parsing import Subcommands
from mailer.config import Settings, load_or_exit
from mailer.errors import MailerError


def cmd_inbound(args: argparse.Namespace) -> int:
    """Run the inbound SMTP listener (SPEC 12) until SIGTERM; idle when unconfigured."""
    from mailer.inbound.server import run

    # A long-running service: its start, stop and per-message lines are worth seeing.
    logging.getLogger().setLevel(logging.INFO)
    # A listener that starts with a bad setting would answer 451 to every bounce; check the
    # whole configuration first, like every other process (SPEC 6).
    run(load_or_exit())
    return 0


def cmd_bounces_poll(args: argparse.Namespace) -> int:
    """Poll the bounce mailbox once and print what was found (no addresses)."""
    from mailer.inbound.imap import BouncePoller
    from mailer.runtime import Runtime

    settings = Settings.from_environ()
    if not settings.bounce_imap_url:
        raise MailerError("MAILER_BOUNCE_IMAP_URL is not set")
    report = BouncePoller(Runtime.from_settings(settings)).poll()
    for line in report.lines:
        print(line)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report.mailboxes.items()))
    print(f"{report.seen} messages: {report.processed} processed, {report.failed} failed"
          + (f" ({kinds})" if kinds else ""))
    return 1 if report.failed else 0


def cmd_bounces_unrecognised(args: argparse.Namespace) -> int:
    """List recent reports the reader could not read: structure and masked headers."""
    from datetime import timedelta

    from sqlalchemy import select

    from mailer.runtime import Runtime
    from mailer.store.schema import unrecognised_reports as table

    rt = Runtime.from_settings(Settings.from_environ())
    since = rt.clock() - timedelta(days=args.days)
    with rt.engine.connect() as conn:
        rows = conn.execute(select(table).where(table.c.received_at >= since)
                            .order_by(table.c.received_at.desc()).limit(args.limit)).all()
    for row in rows:
        print(f"{row.received_at:%Y-%m-%d %H:%M:%S} {row.source} reader={row.reader} "
              f"{row.size} bytes")
        print(f"  structure: {row.structure}")
        for line in row.headers.splitlines():
            print(f"  {line}")
    print(f"{len(rows)} unrecognised report(s) in the last {args.days} day(s)", file=sys.stderr)
    return 0


def add_commands(sub: Subcommands) -> None:
    """Register ``mailer inbound`` and ``mailer bounces poll|unrecognised``."""
    inbound = sub.add_parser("inbound", help="SMTP listener for bounces, fbl@ and mailto: "
                             "unsubscribes (MAILER_INBOUND_DOMAIN)")
    inbound.set_defaults(func=cmd_inbound)

    bounces = sub.add_parser("bounces", help="bounce mailbox and unread reports").add_subparsers(
        dest="bounces", required=True)
    poll = bounces.add_parser("poll", help="poll MAILER_BOUNCE_IMAP_URL once")
    poll.set_defaults(func=cmd_bounces_poll)
    unread = bounces.add_parser("unrecognised", help="recent reports the reader could not read")
    unread.add_argument("--days", type=int, default=7)
    unread.add_argument("--limit", type=int, default=50)
    unread.set_defaults(func=cmd_bounces_unrecognised)
