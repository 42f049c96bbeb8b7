"""``mailer db``: the database schema (Alembic migrations)."""

from __future__ import annotations

import argparse
import sys

from mailer.cli.parsing import Subcommands
from mailer.config import Settings


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply migrations."""
    from mailer.store.db import upgrade

    settings = Settings.from_environ(require_secret=False)
    upgrade(settings.database_url, args.revision)
    print("database is at the latest schema", file=sys.stderr)
    return 0


def add_commands(sub: Subcommands) -> None:
    """Register ``mailer db ...``."""
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db", required=True)
    up = db.add_parser("upgrade", help="apply Alembic migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)
