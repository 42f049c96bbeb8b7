"""The ``mailer`` console script (SPEC 11)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mailer.config import Settings
from mailer.errors import MailerError


def _settings(require_secret: bool = True) -> Settings:
    return Settings.from_environ(require_secret=require_secret)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply migrations."""
    from mailer.store.db import upgrade

    settings = _settings(require_secret=False)
    upgrade(settings.database_url, args.revision)
    print("database is at the latest schema", file=sys.stderr)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create an API key and print only the key on stdout."""
    from mailer.keys import create_key
    from mailer.store.db import make_engine

    engine = make_engine(_settings(require_secret=False).database_url)
    with engine.begin() as conn:
        key = create_key(conn, args.name, args.scope)
    print(key)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """Accept one message from the shell, as an admin caller."""
    from datetime import datetime

    from mailer.keys import ApiKey
    from mailer.runtime import Runtime
    from mailer.sending.accept import Acceptor, SendRequest

    data = json.loads(args.data) if args.data else {}
    if not isinstance(data, dict):
        raise MailerError("--data must be a JSON object")
    rt = Runtime.from_settings(_settings())
    body = {"template": args.template, "to": args.to, "data": data, "topic": args.topic}
    request = SendRequest(
        template=args.template, email=args.to, external_id=args.external_id, name=args.name,
        data=data, topic=args.topic,
        send_at=datetime.fromisoformat(args.send_at) if args.send_at else None, body=body,
    )
    [result] = Acceptor(rt).accept(ApiKey(id=0, name="cli", scopes=frozenset({"admin"})),
                                   [request])
    print(json.dumps(result))
    return 1 if "error" in result else 0


def cmd_suppressions_import(args: argparse.Namespace) -> int:
    """Import a suppression CSV; bad rows are listed by line, good rows are kept."""
    from mailer.preferences.suppression_csv import import_csv
    from mailer.runtime import Runtime

    rt = Runtime.from_settings(_settings())
    report = import_csv(rt, Path(args.file), source=args.source)
    for line, message in report.errors:
        print(f"line {line}: {message}", file=sys.stderr)
    if report.bad > len(report.errors):
        print(f"... and {report.bad - len(report.errors)} more bad rows", file=sys.stderr)
    print(f"{report.added} added, {report.existing} already present, {report.bad} bad rows",
          file=sys.stderr)
    return 1 if report.bad else 0


def cmd_suppressions_export(args: argparse.Namespace) -> int:
    """Write the whole suppression list as CSV (``-`` for stdout)."""
    from mailer.preferences.suppression_csv import export_csv
    from mailer.runtime import Runtime

    rt = Runtime.from_settings(_settings())
    written = export_csv(rt, args.file)
    print(f"{written} entries exported", file=sys.stderr)
    return 0


def cmd_campaign_status(args: argparse.Namespace) -> int:
    """Show a campaign's progress and counts; ``--watch`` keeps a live bar until it ends."""
    from typing import Any

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mailer.campaigns import lifecycle as campaigns
    from mailer.store.db import make_engine

    engine = make_engine(_settings(require_secret=False).database_url)

    def snapshot() -> dict[str, Any]:
        with engine.connect() as conn:
            row = campaigns.get(conn, args.id)
            return campaigns.view(row, campaigns.counts(conn, [row])[row.id])

    def progress_of(view: dict[str, Any]) -> tuple[int, int, str]:
        counts = view["counts"]
        done = sum(counts[k] for k in ("sent", "suppressed", "failed", "bounced",
                                        "complained", "unknown", "cancelled"))
        detail = ", ".join(f"{k} {counts[k]}" for k in (
            "sent", "queued", "held", "suppressed", "failed", "bounced", "complained",
            "unsubscribed") if counts[k] or k in ("sent", "queued"))
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


def cmd_sink(args: argparse.Namespace) -> int:
    """Run the capturing SMTP sink in the foreground."""
    from mailer.smtp.sink import run_sink

    settings = _settings()
    run_sink(args.host, args.port or settings.smtp_port, Path(args.dir or settings.sink_dir))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    """Run web, worker, scheduler and sink together until Ctrl-C."""
    settings = _settings()
    from mailer.store.db import upgrade

    upgrade(settings.database_url)
    python = sys.executable
    env = dict(os.environ)
    procs = {
        "sink": [python, "-m", "mailer.cli", "sink"],
        "web": [python, "-m", "uvicorn", "--factory", "mailer.api.app:create_app",
                "--host", args.host, "--port", str(args.port), "--no-access-log"],
        "worker": [python, "-m", "dramatiq", "workers.actors", "--processes",
                   str(args.processes), "--threads", str(args.threads)],
        "scheduler": [python, "-m", "workers.scheduler"],
    }
    running: dict[str, subprocess.Popen[bytes]] = {}
    for name, command in procs.items():
        running[name] = subprocess.Popen(command, env=env)  # noqa: S603 - our own modules
        print(f"started {name} (pid {running[name].pid})", file=sys.stderr)
    print(f"mailer is up: API on http://{args.host}:{args.port}, sink mail in "
          f"{settings.sink_dir}/ - Ctrl-C stops everything", file=sys.stderr)
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = 0
    while not stopping:
        for name, proc in running.items():
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; stopping", file=sys.stderr)
                stopping, code = True, 1
        time.sleep(0.5)
    for proc in running.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in running.values():
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="mailer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    up = db.add_parser("upgrade", help="apply Alembic migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key; prints only the key")
    create.add_argument("name")
    create.add_argument("--scope", action="append", required=True,
                        help="messages:transactional, messages:legal, marketing, recipients, "
                             "admin (repeat for several)")
    create.set_defaults(func=cmd_keys_create)

    send = sub.add_parser("send", help="enqueue one message")
    send.add_argument("--template", required=True)
    send.add_argument("--to", required=True)
    send.add_argument("--name")
    send.add_argument("--external-id")
    send.add_argument("--data", help="template variables as a JSON object")
    send.add_argument("--topic")
    send.add_argument("--send-at", help="ISO 8601 time with zone")
    send.set_defaults(func=cmd_send)

    supp = sub.add_parser("suppressions", help="suppression list as CSV").add_subparsers(
        dest="suppressions", required=True)
    imp = supp.add_parser("import", help="add entries from a CSV (header: email,scope,reason,...)")
    imp.add_argument("file")
    imp.add_argument("--source", default="import", help="source recorded on rows without one")
    imp.set_defaults(func=cmd_suppressions_import)
    exp = supp.add_parser("export", help="write every entry as CSV ('-' for stdout)")
    exp.add_argument("file")
    exp.set_defaults(func=cmd_suppressions_export)

    campaign = sub.add_parser("campaign", help="campaigns").add_subparsers(
        dest="campaign", required=True)
    status = campaign.add_parser("status", help="progress and counts of one campaign")
    status.add_argument("id")
    status.add_argument("--watch", action="store_true", help="live progress bar until it ends")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    status.add_argument("--json", action="store_true", help="print the API's view as JSON")
    status.set_defaults(func=cmd_campaign_status)

    sink = sub.add_parser("sink", help="local capturing SMTP server storing .eml files")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=0, help="default: MAILER_SMTP_PORT")
    sink.add_argument("--dir", help="default: MAILER_SINK_DIR or var/sink")
    sink.set_defaults(func=cmd_sink)

    dev = sub.add_parser("dev", help="run API, worker, scheduler and sink on one machine")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--processes", type=int, default=2)
    dev.add_argument("--threads", type=int, default=4)
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors are one clear line on stderr and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MailerError as exc:
        print(f"mailer: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
