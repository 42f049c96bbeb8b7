"""The ``mailer`` console script, run as a user would (SPEC 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, unique_email


def mailer(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return subprocess.run(
        [sys.executable, "-m", "mailer.cli", *args], cwd=ROOT, text=True,
        capture_output=True, timeout=60, env={**clean, "PYTHONPATH": str(ROOT), **env},
    )


def test_db_upgrade_and_keys_create_need_no_secret(tmp_path: Path) -> None:
    # Given a production environment with no secret key, only a database URL
    env = {"MAILER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    # When migrating and creating a key
    up = mailer("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    made = mailer("keys", "create", "ops", "--scope", "admin", "--scope", "marketing", env=env)
    # Then stdout is exactly the key, one line
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mk_") and len(lines[0]) > 40
    # And a bad scope is a clear one-line error, exit status 2
    bad = mailer("keys", "create", "x", "--scope", "everything", env=env)
    assert bad.returncode == 2
    assert "unknown or missing scope" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_send_from_the_shell(env: dict[str, str], runtime: Any) -> None:
    from sqlalchemy import select

    from mailer.store.schema import messages

    # When a message is enqueued from the shell
    address = unique_email("cli")
    done = mailer("send", "--template", "registration_confirmation", "--to", address,
                  "--data", json.dumps({"name": "Cli", "confirm_url": "https://e.test/c"}),
                  env=env)
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
                     env=prod)
    assert refused.returncode == 2
    assert "MAILER_SECRET_KEY is required" in refused.stderr
