"""The ``mailer`` console script (SPEC 11); one module per command group."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mailer.cli import campaign, db, dev, inbound, keys, send, suppressions
from mailer.config import Settings
from mailer.dotenv import load_env_file
from mailer.errors import ConfigError, MailerError

#: The command groups, in the order ``mailer --help`` lists them.
GROUPS = (db, keys, send, suppressions, campaign, dev, inbound)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="mailer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
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

