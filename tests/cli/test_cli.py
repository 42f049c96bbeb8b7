"""The ``mailer`` console script, run as a user would (SPEC 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, unique_email
from tests.services import free_port

#: The console script pip installed next to this interpreter: what a user types.
MAILER = Path(sys.executable).parent / "mailer"


def mailer(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``mailer`` in ``cwd`` with only ``env``'s MAILER_* variables (none from here)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return subprocess.run(
        [str(MAILER), *args], cwd=cwd, text=True, capture_output=True, timeout=60,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (status 2, no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailer: "), done.stderr
    return lines[0]


def test_db_upgrade_and_keys_create_need_no_secret(tmp_path: Path) -> None:
    # Given a production environment with no secret key, only a database URL
    env = {"MAILER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    # When migrating and creating a key
    up = mailer("db", "upgrade", env=env, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    made = mailer("keys", "create", "ops", "--scope", "admin", "--scope", "marketing", env=env,
                  cwd=tmp_path)
    # Then stdout is exactly the key, one line
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mk_") and len(lines[0]) > 40
    # And a bad scope is a clear one-line error, exit status 2
    bad = mailer("keys", "create", "x", "--scope", "everything", env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert "unknown or missing scope" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_send_from_the_shell(env: dict[str, str], runtime: Any, tmp_path: Path) -> None:
    from sqlalchemy import select

    from mailer.store.schema import messages

    # When a message is enqueued from the shell
    address = unique_email("cli")
    done = mailer("send", "--template", "registration_confirmation", "--to", address,
                  "--data", json.dumps({"name": "Cli", "confirm_url": "https://e.test/c"}),
                  env=env, cwd=tmp_path)
    # Then it prints the accept result and the row is queued
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "queued"
    with runtime.engine.connect() as conn:
        status = conn.execute(select(messages.c.status).where(
            messages.c.id == result["id"])).scalar_one()
    assert status in ("queued", "sending", "sent")
    # And without a secret outside development it refuses clearly
    prod = {k: v for k, v in env.items() if k not in ("MAILER_SECRET_KEY", "MAILER_ENV")}
    refused = mailer("send", "--template", "registration_confirmation", "--to", address,
                     env=prod, cwd=tmp_path)
    assert refused.returncode == 2
    assert "MAILER_SECRET_KEY is required" in refused.stderr


# --- .env: the settings `make run` leaves for a second terminal -----------------------------


def test_env_file_fills_in_what_the_shell_leaves_unset(tmp_path: Path) -> None:
    # Given a directory with a .env like the one `make run` writes, and a shell with no
    # MAILER_* variable at all
    db = tmp_path / "var" / "dev.db"
    (tmp_path / ".env").write_text(
        "# Written by `make run`\n"
        "MAILER_ENV='development'\n"
        f"MAILER_DATABASE_URL='sqlite:///{db}'\n"
        "export MAILER_POSTAL_ADDRESS=\"Example Ltd, 1 Example Street\"\n"
    )
    # When migrating and creating a key there
    up = mailer("db", "upgrade", env={}, cwd=tmp_path)
    made = mailer("keys", "create", "demo", "--scope", "admin", env={}, cwd=tmp_path)
    # Then both used the .env's database
    assert up.returncode == 0, up.stderr
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("mk_") and db.is_file()
    # And a variable set in the shell wins over the file: this other database is empty
    other = tmp_path / "other.db"
    again = mailer("keys", "create", "demo", "--scope", "admin",
                   env={"MAILER_DATABASE_URL": f"sqlite:///{other}"}, cwd=tmp_path)
    line = one_line_error(again)
    assert "database not migrated" in line and str(other) in line
    # And a line that is not NAME=value is named by file and line number
    (tmp_path / ".env").write_text("MAILER_ENV=development\nnot a setting\n")
    broken = one_line_error(mailer("keys", "create", "x", "--scope", "admin", env={},
                                   cwd=tmp_path))
    assert ".env:2: not a NAME=value line" in broken


# --- mistakes a user makes in the first hour: one line and status 2, never a traceback ------


@pytest.fixture
def migrated(tmp_path: Path) -> dict[str, str]:
    """A development environment with a migrated SQLite database of its own."""
    env = {"MAILER_ENV": "development",
           "MAILER_DATABASE_URL": f"sqlite:///{tmp_path / 'migrated.db'}",
           "MAILER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    up = mailer("db", "upgrade", env=env, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    return env


SEND = ("send", "--template", "registration_confirmation", "--to", "ada@example.com")
DATA = json.dumps({"name": "Ada", "confirm_url": "https://example.com/confirm/1"})


@pytest.mark.parametrize(("args", "expected"), [
    ((*SEND, "--data", "{name: 'Ada'}"), "mailer: --data is not valid JSON: Expecting property "
                                         "name enclosed in double quotes at column 2"),
    ((*SEND, "--data", "[1, 2]"), "mailer: --data must be a JSON object"),
    (("suppressions", "import", "nope.csv"), "mailer: no such file: nope.csv"),
    (("suppressions", "export", "no/dir/out.csv"), "mailer: no such file: no/dir/out.csv"),
])
def test_bad_input_is_one_line(tmp_path: Path, migrated: dict[str, str], args: tuple[str, ...],
                               expected: str) -> None:
    # Given a working development setup
    # When the command is given bad input
    done = mailer(*args, env=migrated, cwd=tmp_path)
    # Then it says what is wrong in one line, with status 2
    assert one_line_error(done) == expected


def test_outside_the_repository_it_says_to_migrate_and_why(tmp_path: Path) -> None:
    # Given a directory with no .env and a shell that names no database
    # When a key is created there (the default database is var/mailer.db, relative)
    done = mailer("keys", "create", "demo", "--scope", "admin", env={"MAILER_ENV": "development"},
                  cwd=tmp_path)
    # Then it says the database is not migrated, how to fix it, and why that database
    line = one_line_error(done)
    assert line.startswith("mailer: database not migrated (sqlite:///var/mailer.db: "
                           "no such table: api_keys): run `mailer db upgrade`")
    assert "no .env in this directory and MAILER_DATABASE_URL is unset" in line


def test_an_unmigrated_or_unreachable_database_is_named_without_its_password(
    tmp_path: Path,
) -> None:
    # Given an explicit, empty SQLite database
    empty = {"MAILER_ENV": "development", "MAILER_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"}
    # When sending from the shell
    line = one_line_error(mailer(*SEND, "--data", DATA, env=empty, cwd=tmp_path))
    # Then the one line says to migrate, and gives no .env hint since the URL was set
    assert "database not migrated" in line and "run `mailer db upgrade`" in line
    assert ".env" not in line
    # And a PostgreSQL server that is not there is named with its password hidden
    down = {"MAILER_DATABASE_URL": f"postgresql://ops:s3cret-pw@127.0.0.1:{free_port()}/mailer"}
    line = one_line_error(mailer("keys", "create", "x", "--scope", "admin", env=down,
                                 cwd=tmp_path))
    assert line.startswith("mailer: cannot use the database postgresql://ops:***@127.0.0.1:")
    assert "s3cret-pw" not in line


def test_a_missing_secret_outside_development_says_where_settings_come_from(
    tmp_path: Path, migrated: dict[str, str]
) -> None:
    # Given production mode (no MAILER_ENV) without a secret key, and no .env here
    prod = {k: v for k, v in migrated.items() if k != "MAILER_ENV"}
    # When sending
    line = one_line_error(mailer(*SEND, "--data", DATA, env=prod, cwd=tmp_path))
    # Then the line names the missing variable and the .env that `make run` writes
    assert "MAILER_SECRET_KEY is required outside development" in line
    assert "no .env in this directory: `make run` writes one" in line
