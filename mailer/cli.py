"""The ``mailer`` console script (SPEC 11)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mailer.config import Settings, load_env_file
from mailer.errors import ConfigError, MailerError


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
    from mailer.sending.accept import Acceptor, Refused, SendRequest

    try:
        data = json.loads(args.data) if args.data else {}
    except json.JSONDecodeError as exc:
        raise MailerError(f"--data is not valid JSON: {exc.msg} at column {exc.colno}") from None
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
    if isinstance(result, Refused):
        # The API's error body, plus the HTTP status the API would have answered with.
        print(json.dumps({**result.as_json(), "status": result.error.status}))
        return 1
    print(json.dumps(result.as_json()))
    return 0


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
    from mailer.store.status import FINAL
    from mailer.store.status import MessageStatus as S

    engine = make_engine(_settings(require_secret=False).database_url)

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


def cmd_sink(args: argparse.Namespace) -> int:
    """Run the capturing SMTP sink in the foreground."""
    from mailer.smtp.sink import run_sink

    settings = _settings()
    run_sink(args.host, args.port or settings.smtp_port, Path(args.dir or settings.sink_dir))
    return 0


def cmd_inbound(args: argparse.Namespace) -> int:
    """Run the inbound SMTP listener (SPEC 12) until SIGTERM; idle when unconfigured."""
    from mailer.inbound.server import run

    # A long-running service: its start, stop and per-message lines are worth seeing.
    logging.getLogger().setLevel(logging.INFO)
    run(_settings())
    return 0


def cmd_bounces_poll(args: argparse.Namespace) -> int:
    """Poll the bounce mailbox once and print what was found (no addresses)."""
    from mailer.inbound.imap import BouncePoller
    from mailer.runtime import Runtime

    settings = _settings()
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

    rt = Runtime.from_settings(_settings())
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


#: ``mailer dev``: how long to wait for the API's ``/readyz`` to answer 200 (seconds).
DEV_READY_TIMEOUT = 60.0
#: ``mailer dev``: how long the processes get to finish in-flight work once stopped, before
#: SIGTERM; and after that SIGTERM, before SIGKILL (seconds).
DEV_STOP_TIMEOUT = 30.0
DEV_KILL_TIMEOUT = 5.0


def _readyz(host: str, port: int) -> str:
    """GET the API's ``/readyz`` once: ``"ready"``, else what answered (for a message)."""
    import urllib.error
    import urllib.request

    if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard bind answers on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    netloc = f"[{host}]" if ":" in host else host
    # No proxy: a proxy named in the environment must not answer for our own API.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{netloc}:{port}/readyz", timeout=2) as reply:
            return "ready" if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        try:
            checks = json.loads(exc.read())["checks"]
            return f"HTTP {exc.code} ({', '.join(f'{k} {v}' for k, v in checks.items())})"
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"HTTP {exc.code}"
    except OSError as exc:
        return f"no answer ({type(exc).__name__})"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        # The command name may hold spaces and ')': the parent pid follows the last ')'.
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait until every process has ended or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))


def _stop_all(running: dict[str, subprocess.Popen[bytes]], first_signal: int | None,
              timeout: float) -> int:
    """Stop the ``mailer dev`` processes with one signal each, waiting ``timeout`` seconds.

    Ctrl-C reaches the whole foreground process group, these processes included, so after
    SIGINT nothing is sent: a second signal would make dramatiq kill its workers in the
    middle of a message (its second signal means "now") and uvicorn skip its graceful
    shutdown. A SIGTERM (or a crashed process) was sent to us alone: it is passed on once.
    Whatever is still running after ``timeout`` gets SIGTERM, then SIGKILL with its
    descendants. Returns 1 when a process had to be forced or ended badly, else 0.
    """
    live = {name: proc for name, proc in running.items() if proc.poll() is None}
    if first_signal != signal.SIGINT:
        for proc in live.values():
            proc.send_signal(signal.SIGTERM)
    if live:
        print(f"stopping: waiting up to {timeout:g} s for {', '.join(live)} to finish",
              file=sys.stderr)
    _wait_all(list(live.values()), timeout)
    code = 0
    late = {name: proc for name, proc in live.items() if proc.poll() is None}
    if late:
        code = 1
        print(f"{', '.join(late)} still running after {timeout:g} s: sending SIGTERM",
              file=sys.stderr)
        for proc in late.values():
            proc.send_signal(signal.SIGTERM)
        _wait_all(list(late.values()), DEV_KILL_TIMEOUT)
        for name, proc in late.items():
            if proc.poll() is None:
                print(f"{name} still running: killing it (pid {proc.pid})", file=sys.stderr)
                # Its descendants first: once it is gone they no longer name it as parent.
                for pid in [*_descendants(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()
    # A process stopped by a signal ends with 0 or by that signal (uvicorn re-raises it).
    clean = {0, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM}
    for name, proc in live.items():
        if name not in late and proc.returncode not in clean:
            print(f"{name} exited with {proc.returncode} while stopping", file=sys.stderr)
            code = 1
    return code


def cmd_dev(args: argparse.Namespace) -> int:
    """Run web, worker, scheduler and sink until Ctrl-C or SIGTERM; "up" once ``/readyz`` is 200."""
    settings = _settings()
    from mailer.store.db import upgrade

    upgrade(settings.database_url)
    # The Procfile's web reads PORT too, so one variable moves the API everywhere.
    port = args.port or int(os.environ.get("PORT") or 8000)
    received: list[int] = []

    def _on_signal(signum: int, frame: object) -> None:
        received.append(signum)

    # Before the processes start, so a Ctrl-C during start-up is a clean stop too.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    python = sys.executable
    procs = {
        "sink": [python, "-m", "mailer.cli", "sink"],
        "web": [python, "-m", "uvicorn", "--factory", "mailer.api.app:create_app",
                "--host", args.host, "--port", str(port), "--no-access-log"],
        "worker": [python, "-m", "dramatiq", "workers.actors", "--processes",
                   str(args.processes), "--threads", str(args.threads)],
        "scheduler": [python, "-m", "workers.scheduler"],
    }
    running: dict[str, subprocess.Popen[bytes]] = {}
    for name, command in procs.items():
        running[name] = subprocess.Popen(command, env=dict(os.environ))  # noqa: S603 - ours
        print(f"started {name} (pid {running[name].pid})", file=sys.stderr)

    def crashed() -> str | None:
        for name, proc in running.items():
            if proc.poll() is not None:
                return f"{name} exited with {proc.returncode}"
        return None

    code = 0
    deadline = time.monotonic() + args.ready_timeout
    last = "no answer"
    while not received:
        failure = crashed()
        if failure is not None:
            print(f"{failure} before the API was ready; stopping", file=sys.stderr)
            code = 1
            break
        last = _readyz(args.host, port)
        if last == "ready":
            print(f"mailer is up: API on http://{args.host}:{port}, SMTP sink on "
                  f"127.0.0.1:{settings.smtp_port} storing mail in {settings.sink_dir}/ - "
                  "Ctrl-C stops everything", file=sys.stderr)
            break
        if time.monotonic() > deadline:
            print(f"the API did not answer /readyz with 200 within {args.ready_timeout:g} s "
                  f"(last: {last}); stopping", file=sys.stderr)
            code = 1
            break
        time.sleep(0.2)
    while code == 0 and not received:
        failure = crashed()
        if failure is not None:
            print(f"{failure}; stopping", file=sys.stderr)
            code = 1
        time.sleep(0.2)
    stopped = _stop_all(running, received[0] if received else None, args.stop_timeout)
    if received:
        print("mailer stopped", file=sys.stderr)
    return max(code, stopped)


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

    dev = sub.add_parser("dev", help="run API, worker, scheduler and sink on one machine")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=0, help="API port (default: PORT or 8000)")
    dev.add_argument("--processes", type=int, default=2)
    dev.add_argument("--threads", type=int, default=4)
    dev.add_argument("--ready-timeout", type=float, default=DEV_READY_TIMEOUT,
                     help="seconds to wait for /readyz before giving up")
    dev.add_argument("--stop-timeout", type=float, default=DEV_STOP_TIMEOUT,
                     help="seconds in-flight work gets after Ctrl-C before SIGTERM")
    dev.set_defaults(func=cmd_dev)
    return parser


def _redacted(url: str) -> str:
    """``url`` without its password, for a message."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(unparseable URL)"


def _unset_hint(variable: str, dotenv: bool) -> str:
    """Why the default was used, when it was: no ``.env`` here and ``variable`` unset."""
    if dotenv or os.environ.get(variable):
        return ""
    return (f" (no .env in this directory and {variable} is unset: run mailer from the "
            "repository after `make run`, or set the variable)")


def _explain(exc: Exception, dotenv: bool) -> str | None:
    """One line for an error the user can fix (a file, the database, Redis), else None."""
    if isinstance(exc, OSError) and exc.filename is not None:
        reason = "no such file" if isinstance(exc, FileNotFoundError) else (
            (exc.strerror or type(exc).__name__).lower())
        return f"{reason}: {exc.filename}"
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        detail = (str(exc.orig).strip().splitlines() or [""])[0]
        url = _redacted(os.environ.get("MAILER_DATABASE_URL") or Settings.database_url)
        hint = _unset_hint("MAILER_DATABASE_URL", dotenv)
        kind = type(exc.orig).__name__
        if (kind in ("UndefinedTable", "UndefinedColumn") or "no such table" in detail
                or "no such column" in detail):
            return f"database not migrated ({url}: {detail}): run `mailer db upgrade`{hint}"
        return f"cannot use the database {url}: {detail}{hint}"
    import redis.exceptions

    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        url = _redacted(os.environ.get("MAILER_REDIS_URL") or Settings.redis_url)
        hint = _unset_hint("MAILER_REDIS_URL", dotenv)
        return f"cannot reach Redis at {url} ({exc}): is `make run` up?{hint}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors are one clear line on stderr and exit status 2.

    ``.env`` in the current directory, when present, fills in unset variables first.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    dotenv = False
    try:
        # The development settings `make run` writes; a variable set in the shell wins.
        dotenv = load_env_file(Path(".env"))
        return int(args.func(args))
    except MailerError as exc:
        hint = " (no .env in this directory: `make run` writes one)" if (
            isinstance(exc, ConfigError) and not dotenv) else ""
        print(f"mailer: {getattr(exc, 'message', exc)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _explain(exc, dotenv)
        if message is None:
            raise  # a bug: the traceback is what its report needs
        print(f"mailer: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
