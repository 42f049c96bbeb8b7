"""Suppression list import and export as CSV (``mailer suppressions import|export``, SPEC 4).

Import keeps every good row and reports each bad one by its line number, without ever
echoing the address (error output ends up in terminals, CI logs and tickets). A row may
carry only ``email_hash``: that is how an ``erased`` entry travels, and it only means
something to an installation with the same ``MAILER_SECRET_KEY``.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from sqlalchemy import Connection, func, insert, select, tuple_
from sqlalchemy.exc import IntegrityError

from mailer.errors import MailerError
from mailer.runtime import Runtime
from mailer.store.db import refresh_statistics
from mailer.store.recipients import SUPPRESSION_REASONS, add_suppression
from mailer.store.schema import suppressions
from mailer.times import iso
from suppression.addresses import InvalidAddressError

#: Columns written by export and understood by import (only ``email`` or ``email_hash``
#: is required; the rest default to scope ``all``, reason ``manual``, source ``import``).
COLUMNS = ("email", "email_hash", "scope", "reason", "source", "created_at", "expires_at")
#: Rows written per transaction on import.
DEFAULT_BATCH = 1000
#: An import adding this many rows refreshes the planner's statistics at once (PostgreSQL).
ANALYZE_AFTER = 1000
#: At most this many bad rows are kept in the report; the count covers them all.
MAX_REPORTED_ERRORS = 1000

_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ImportReport:
    """What an import did: rows added, rows already present, and bad rows by line."""

    added: int = 0
    existing: int = 0
    bad: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)

    def fail(self, line: int, message: str) -> None:
        """Count a bad row and keep its message (up to :data:`MAX_REPORTED_ERRORS`)."""
        self.bad += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append((line, message))


class RowError(ValueError):
    """Raised for a CSV row that cannot be imported; the message never quotes the row."""


def _when(text: str, column: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise RowError(f"{column} is not an ISO 8601 time") from None
    # A time without a zone is read as UTC, which is what export writes.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_row(rt: Runtime, row: dict[str, str], now: datetime, default_source: str
              ) -> dict[str, Any]:
    """One CSV row as a ``suppressions`` row; raise :class:`RowError` when it is bad."""
    raw_email = (row.get("email") or "").strip()
    raw_hash = (row.get("email_hash") or "").strip().lower()
    email: str | None = None
    if raw_email:
        try:
            address = rt.address(raw_email)
        except InvalidAddressError:
            raise RowError("not a valid email address") from None
        email, email_hash = address.email, address.hash
    elif raw_hash:
        if not _HASH.match(raw_hash):
            raise RowError("email_hash is not 64 hexadecimal digits")
        email_hash = raw_hash
    else:
        raise RowError("no email (and no email_hash)")
    scope = (row.get("scope") or "all").strip().lower()
    if scope not in ("all", "marketing"):
        raise RowError("scope must be all or marketing")
    reason = (row.get("reason") or "manual").strip().lower()
    if reason not in SUPPRESSION_REASONS:
        raise RowError(f"reason must be one of {', '.join(sorted(SUPPRESSION_REASONS))}")
    source = (row.get("source") or default_source).strip()
    if len(source) > 200:
        raise RowError("source is longer than 200 characters")
    return {
        # An erased entry must never carry the address again, whatever the file says.
        "email": None if reason == "erased" else email,
        "email_hash": email_hash,
        "scope": scope,
        "reason": reason,
        "source": source,
        "created_at": _when((row.get("created_at") or "").strip(), "created_at") or now,
        "expires_at": _when((row.get("expires_at") or "").strip(), "expires_at"),
    }


def _store(conn: Connection, rows: list[dict[str, Any]], report: ImportReport) -> None:
    """Insert the rows not present yet (one entry per address and reason)."""
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        unique.setdefault((row["email_hash"], row["reason"]), row)
    report.existing += len(rows) - len(unique)
    if not unique:
        return
    present = {
        (r.email_hash, r.reason)
        for r in conn.execute(
            select(suppressions.c.email_hash, suppressions.c.reason).where(
                tuple_(suppressions.c.email_hash, suppressions.c.reason).in_(list(unique))
            )
        )
    }
    fresh = [row for key, row in unique.items() if key not in present]
    report.existing += len(unique) - len(fresh)
    if not fresh:
        return
    try:
        with conn.begin_nested():
            conn.execute(insert(suppressions), fresh)
        report.added += len(fresh)
    except IntegrityError:
        # Someone else added one of them meanwhile: go row by row for this batch.
        for row in fresh:
            added = add_suppression(
                conn, None, row["email_hash"], row["scope"], row["reason"], row["source"],
                row["created_at"], row["expires_at"],
            )
            if added and row["email"]:
                conn.execute(suppressions.update().where(
                    suppressions.c.email_hash == row["email_hash"],
                    suppressions.c.reason == row["reason"],
                ).values(email=row["email"]))
            report.added += int(added)
            report.existing += int(not added)


def _reader(text: IO[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows with the line they end on; a file without a header row is a list of addresses."""
    rows = csv.reader(text)
    header = next(rows, None)
    if header is None:
        return
    names = [h.strip().lower() for h in header]
    if "email" not in names and "email_hash" not in names:
        if header and "@" in header[0]:
            names = ["email"]
            yield rows.line_num, {"email": header[0]}
        else:
            raise MailerError("the CSV needs a header row with an 'email' column")
    for values in rows:
        if not any(v.strip() for v in values):
            continue
        yield rows.line_num, dict(zip(names, values, strict=False))


def _progress(console: Console, show: bool, amount: ProgressColumn) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), amount,
        TextColumn("{task.fields[rows]} rows"), TimeRemainingColumn(),
        console=console, disable=not show, transient=False,
    )


def import_csv(
    rt: Runtime,
    path: Path,
    *,
    source: str = "import",
    console: Console | None = None,
    show_progress: bool | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> ImportReport:
    """Import a suppression CSV; good rows are kept even when others are bad."""
    console = console or Console(stderr=True)
    show = console.is_terminal if show_progress is None else show_progress
    report = ImportReport()
    size = path.stat().st_size
    with path.open("rb") as raw, _progress(console, show, DownloadColumn()) as progress:
        task: TaskID = progress.add_task("importing", total=size, rows=0)
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        batch: list[dict[str, Any]] = []
        seen = 0

        def flush() -> None:
            with rt.engine.begin() as conn:
                _store(conn, batch, report)
            batch.clear()
            progress.update(task, completed=raw.tell(), rows=seen)

        try:
            for line, row in _reader(text):
                seen += 1
                try:
                    batch.append(parse_row(rt, row, rt.clock(), source))
                except RowError as exc:
                    report.fail(line, str(exc))
                if len(batch) >= batch_size:
                    flush()
        except (UnicodeDecodeError, csv.Error) as exc:
            # Keep what was read so far; the rest of the file cannot be trusted.
            report.fail(seen + 1, f"file unreadable from here on ({type(exc).__name__})")
        if batch:
            flush()
        progress.update(task, completed=size, rows=seen)
    if report.added >= ANALYZE_AFTER:
        # The workers look these up on every slice they send, starting now.
        refresh_statistics(rt.engine, suppressions)
    return report


def export_csv(rt: Runtime, destination: str, *, console: Console | None = None,
               show_progress: bool | None = None, batch_size: int = 5000) -> int:
    """Write every suppression entry as CSV to a path, or to stdout for ``-``; return rows."""
    console = console or Console(stderr=True)
    show = console.is_terminal if show_progress is None else show_progress
    handle: IO[str] = (sys.stdout if destination == "-"
                       else open(destination, "w", encoding="utf-8", newline=""))  # noqa: SIM115
    written = 0
    try:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        with rt.engine.connect() as conn, \
                _progress(console, show, MofNCompleteColumn()) as progress:
            total = int(conn.execute(select(func.count()).select_from(suppressions)).scalar_one())
            task = progress.add_task("exporting", total=total, rows=0)
            last = 0
            while True:
                # Keyset pages: constant memory however long the list is.
                rows = list(conn.execute(
                    select(suppressions).where(suppressions.c.id > last)
                    .order_by(suppressions.c.id).limit(batch_size)
                ))
                if not rows:
                    break
                for r in rows:
                    writer.writerow([
                        r.email or "", r.email_hash, r.scope, r.reason, r.source,
                        iso(r.created_at), iso(r.expires_at) or "",
                    ])
                written += len(rows)
                last = rows[-1].id
                progress.update(task, completed=written, rows=written)
    finally:
        if handle is not sys.stdout:
            handle.close()
        else:
            handle.flush()
    return written
