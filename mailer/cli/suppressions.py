"""``mailer suppressions``: the suppression list as CSV."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mailer.cli.parsing import Subcommands
from mailer.config import Settings


def cmd_suppressions_import(args: argparse.Namespace) -> int:
    """Import a suppression CSV; bad rows are listed by line, good rows are kept."""
    from mailer.preferences.suppression_csv import import_csv
    from mailer.runtime import Runtime

    rt = Runtime.from_settings(Settings.from_environ())
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

    rt = Runtime.from_settings(Settings.from_environ())
    written = export_csv(rt, args.file)
    print(f"{written} entries exported", file=sys.stderr)
    return 0


def add_commands(sub: Subcommands) -> None:
    """Register ``mailer suppressions import|export``."""
    supp = sub.add_parser("suppressions", help="suppression list as CSV").add_subparsers(
        dest="suppressions", required=True)
    imp = supp.add_parser("import", help="add entries from a CSV (header: email,scope,reason,...)")
    imp.add_argument("file")
    imp.add_argument("--source", default="import", help="source recorded on rows without one")
    imp.set_defaults(func=cmd_suppressions_import)
    exp = supp.add_parser("export", help="write every entry as CSV ('-' for stdout)")
    exp.add_argument("file")
    exp.set_defaults(func=cmd_suppressions_export)
