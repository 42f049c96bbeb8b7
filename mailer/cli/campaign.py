"""``mailer campaign``: a campaign's progress from the shell."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mailer.cli.parsing import Subcommands
from mailer.config import Settings


def cmd_campaign_status(args: argparse.Namespace) -> int:
    """Show a campaign's progress and counts; ``--watch`` keeps a live bar until it ends."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mailer.campaigns import lifecycle as campaigns
    from mailer.store.db import make_engine
    from mailer.store.status import FINAL
    from mailer.store.status import MessageStatus as S

    engine = make_engine(Settings.from_environ(require_secret=False).database_url)

    def snapshot() -> dict[str, Any]:
        with engine.connect() as conn:
            row = campaigns.get(conn, args.id)
            return campaigns.view(row, campaigns.counts(conn, [row])[row.id])

    def progress_of(view: dict[str, Any]) -> tuple[int, int, str]:
        counts = view["counts"]
        done = sum(counts[k] for k in sorted(FINAL))
        shown = (S.SENT, S.QUEUED, S.HELD, S.SUPPRESSED, S.FAILED, S.BOUNCED, S.COMPLAINED,
                 "unsubscribed")
        detail = ", ".join(f"{k} {counts[k]}" for k in shown
                           if counts[k] or k in (S.SENT, S.QUEUED))
        return done, max(counts["audience"], done), f"{view['status']} - {detail}"

    view = snapshot()
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    console = Console()
    columns = (TextColumn(f"[bold]{view['name'][:40]}[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console, auto_refresh=False) as progress:
        done, total, text = progress_of(view)
        task = progress.add_task(text, total=total, completed=done)
        progress.refresh()
        try:
            while args.watch and view["status"] not in campaigns.FINISHED:
                time.sleep(args.interval)
                view = snapshot()
                done, total, text = progress_of(view)
                progress.update(task, completed=done, total=total, description=text)
                progress.refresh()
        except KeyboardInterrupt:
            pass
    reasons = view["suppressed_by_reason"]
    if reasons:
        console.print("suppressed by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    return 0


def add_commands(sub: Subcommands) -> None:
    """Register ``mailer campaign status``."""
    campaign = sub.add_parser("campaign", help="campaigns").add_subparsers(
        dest="campaign", required=True)
    status = campaign.add_parser("status", help="progress and counts of one campaign")
    status.add_argument("id")
    status.add_argument("--watch", action="store_true", help="live progress bar until it ends")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    status.add_argument("--json", action="store_true", help="print the API's view as JSON")
    status.set_defaults(func=cmd_campaign_status)
