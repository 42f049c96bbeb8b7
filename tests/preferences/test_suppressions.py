"""Suppression management: the /v1/suppressions API and ``mailer suppressions import|export``."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, auth, unique_email

REG_DATA = {"name": "Ada", "confirm_url": "https://example.test/welcome"}


def add(client: Any, key: str, **body: Any) -> Any:
    return client.post("/v1/suppressions", json=body, headers=auth(key))


def listing(client: Any, key: str, **params: Any) -> dict[str, Any]:
    r = client.get("/v1/suppressions", params=params, headers=auth(key))
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_manual_entry_blocks_mail_until_an_admin_lifts_it(
    client: Any, keys: dict[str, str]
) -> None:
    # Given an address an operator blocks by hand
    address = unique_email("manual")
    r = add(client, keys["recipients"], email=address)
    # Then the entry is created with scope all, reason manual and who added it
    assert r.status_code == 201, r.text
    entry = r.json()
    assert (entry["email"], entry["scope"], entry["reason"]) == (address, "all", "manual")
    assert entry["source"].startswith("api:")
    # And adding it again returns the same entry
    again = add(client, keys["recipients"], email=address)
    assert (again.status_code, again.json()["id"]) == (200, entry["id"])
    # And even a registration confirmation is suppressed
    sent = client.post("/v1/messages", headers=auth(keys["transactional"]), json={
        "template": "registration_confirmation", "to": address, "data": REG_DATA})
    assert (sent.json()["status"], sent.json()["reason"]) == ("suppressed", "manual")
    # When a non-admin tries to lift it, Then 403
    denied = client.delete(f"/v1/suppressions/{address}", headers=auth(keys["recipients"]))
    assert denied.status_code == 403
    # When an admin lifts it, Then 204, it is gone, and mail flows again
    lifted = client.delete(f"/v1/suppressions/{address}", headers=auth(keys["admin"]))
    assert lifted.status_code == 204
    assert listing(client, keys["recipients"], email=address)["suppressions"] == []
    assert client.delete(f"/v1/suppressions/{address}",
                         headers=auth(keys["admin"])).status_code == 404
    sent = client.post("/v1/messages", headers=auth(keys["transactional"]), json={
        "template": "registration_confirmation", "to": address, "data": REG_DATA})
    assert sent.json()["status"] == "queued"


def test_lookup_by_address_uses_the_normalised_form(client: Any, keys: dict[str, str]) -> None:
    # Given an entry added with the domain in capitals
    address = unique_email("norm")
    local, domain = address.split("@")
    assert add(client, keys["recipients"], email=f"{local}@{domain.upper()}",
               scope="marketing", reason="unsubscribed").status_code == 201
    # When it is looked up by the usual spelling, Then it is found, stored normalised
    [entry] = listing(client, keys["recipients"], email=address)["suppressions"]
    assert entry["email"] == address
    assert (entry["scope"], entry["reason"]) == ("marketing", "unsubscribed")


@pytest.mark.parametrize(("body", "status"), [
    ({"email": "not an address"}, 422),
    ({"email": "x@example.org", "reason": "erased"}, 422),
    ({"email": "x@example.org", "reason": "soft_bounce_limit"}, 422),
    ({"email": "x@example.org", "scope": "everything"}, 422),
    ({"email": "x@example.org", "extra": 1}, 422),
])
def test_bad_entries_are_refused(client: Any, keys: dict[str, str], body: dict[str, Any],
                                 status: int) -> None:
    r = add(client, keys["recipients"], **body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"code", "message", "details"}


def test_the_api_needs_the_recipients_scope(client: Any, keys: dict[str, str]) -> None:
    assert client.get("/v1/suppressions").status_code == 401
    assert client.get("/v1/suppressions", headers=auth(keys["marketing"])).status_code == 403
    assert add(client, keys["transactional"], email=unique_email()).status_code == 403


def test_listing_pages_with_a_cursor(client: Any, keys: dict[str, str]) -> None:
    # Given five hard-bounced addresses
    mine = [unique_email("page") for _ in range(5)]
    for address in mine:
        assert add(client, keys["recipients"], email=address,
                   reason="hard_bounce").status_code == 201
    # When the hard bounces are listed two at a time
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"reason": "hard_bounce", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = listing(client, keys["recipients"], **params)
        assert len(page["suppressions"]) <= 2
        seen += page["suppressions"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Then each entry comes exactly once, in order, and only hard bounces
    emails = [s["email"] for s in seen]
    assert all(emails.count(a) == 1 for a in mine)
    assert [s["id"] for s in seen] == sorted(s["id"] for s in seen)
    assert {s["reason"] for s in seen} == {"hard_bounce"}
    # And a made-up cursor is a 422
    r = client.get("/v1/suppressions", params={"cursor": "!!"}, headers=auth(keys["recipients"]))
    assert r.status_code == 422


# --- CSV import and export ----------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``mailer`` command line."""
    return subprocess.run(
        [sys.executable, "-m", "mailer.cli", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=120, check=False,
    )


def test_csv_import_keeps_good_rows_and_reports_bad_ones_by_line(
    client: Any, keys: dict[str, str], env: dict[str, str], runtime: Any, tmp_path: Path
) -> None:
    # Given a CSV with good rows, bad rows, a duplicate, a blank line and a hash-only row
    good = [unique_email("csv") for _ in range(3)]
    erased_hash = runtime.hash_email(unique_email("csverased"))
    secret_bad = f"broken-{good[0]}"  # contains '@', must never be echoed
    lines = [
        "email,scope,reason,source,email_hash",           # 1
        f"{good[0]},all,manual,crm-export,",               # 2
        f"{secret_bad.replace('@', '@@')},all,manual,,",   # 3: invalid address
        f"{good[1]},sometimes,manual,,",                   # 4: bad scope
        f"{good[1]},marketing,unsubscribed,,",             # 5
        "",                                                # 6: blank, skipped
        f"{good[0]},all,manual,,",                         # 7: duplicate of line 2
        f",all,erased,,{erased_hash}",                     # 8: hash only
        f"{good[2]},all,no_such_reason,,",                 # 9: bad reason
        ",all,manual,,",                                   # 10: no address
    ]
    path = tmp_path / "suppressions.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # When it is imported with the real command
    result = run_cli(env, "suppressions", "import", str(path))
    # Then the bad rows are listed by line number, and the exit status says some were bad
    assert result.returncode == 1, result.stderr
    assert "line 3: not a valid email address" in result.stderr
    assert "line 4: scope must be all or marketing" in result.stderr
    assert "line 9: reason must be one of" in result.stderr
    assert "line 10: no email" in result.stderr
    assert "3 added, 1 already present, 4 bad rows" in result.stderr
    # And no address appears in the output
    for address in [*good, secret_bad]:
        assert address not in result.stderr + result.stdout
    # And the good rows are there, with their source
    [first] = listing(client, keys["recipients"], email=good[0])["suppressions"]
    assert (first["reason"], first["source"]) == ("manual", "crm-export")
    [second] = listing(client, keys["recipients"], email=good[1])["suppressions"]
    assert (second["scope"], second["reason"], second["source"]) == (
        "marketing", "unsubscribed", "import")
    assert listing(client, keys["recipients"], email=good[2])["suppressions"] == []

    # When the list is exported to stdout
    exported = run_cli(env, "suppressions", "export", "-")
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    # Then it has every column, the imported rows, and the erased entry without an address
    assert tuple(rows[0]) == ("email", "email_hash", "scope", "reason", "source",
                              "created_at", "expires_at")
    by_email = {r["email"]: r for r in rows if r["email"]}
    assert by_email[good[0]]["reason"] == "manual"
    [erased] = [r for r in rows if r["email_hash"] == erased_hash]
    assert (erased["email"], erased["reason"]) == ("", "erased")

    # And the export imports again unchanged (a round trip adds nothing)
    path.write_text(exported.stdout, encoding="utf-8")
    again = run_cli(env, "suppressions", "import", str(path))
    assert again.returncode == 0, again.stderr
    assert f"0 added, {len(rows)} already present, 0 bad rows" in again.stderr


def test_a_large_import_shows_progress_and_stays_fast(
    runtime: Any, tmp_path: Path
) -> None:
    from rich.console import Console
    from sqlalchemy import func, select

    from mailer.preferences.suppression_csv import import_csv
    from mailer.store.schema import suppressions

    # Given a 20,000-row file without a header (a plain list of addresses), one row bad
    path = tmp_path / "big.csv"
    addresses = [unique_email("bulk") for _ in range(20_000)]
    addresses[12_345] = "no-at-sign"
    path.write_text("\n".join(addresses) + "\n", encoding="utf-8")
    with runtime.engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(suppressions)).scalar_one()
    # When it is imported on a terminal
    screen = io.StringIO()
    report = import_csv(runtime, path, console=Console(file=screen, force_terminal=True,
                                                       width=100))
    # Then every good row is added, the bad one is reported by its line, and a bar was drawn
    assert (report.added, report.existing, report.bad) == (19_999, 0, 1)
    assert report.errors == [(12_346, "not a valid email address")]
    with runtime.engine.connect() as conn:
        after = conn.execute(select(func.count()).select_from(suppressions)).scalar_one()
    assert after - before == 19_999
    assert "importing" in screen.getvalue() and "20000 rows" in screen.getvalue()


def _last_analyze(runtime: Any) -> Any:
    from sqlalchemy import text

    with runtime.engine.connect() as conn:
        return conn.execute(text(
            "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'suppressions'"
        )).scalar_one()


@pytest.mark.postgresql_only  # the planner statistics ANALYZE refreshes are PostgreSQL's
def test_a_bulk_import_refreshes_the_planner_statistics_a_small_one_does_not(
    runtime: Any, tmp_path: Path
) -> None:
    from rich.console import Console

    from mailer.preferences.suppression_csv import ANALYZE_AFTER, import_csv

    quiet = Console(file=io.StringIO())
    # Given a small import (fewer rows than the threshold)
    small = tmp_path / "small.csv"
    small.write_text("\n".join(unique_email("few") for _ in range(10)) + "\n")
    before = _last_analyze(runtime)
    assert import_csv(runtime, small, console=quiet).added == 10
    # Then the table was not analysed by hand (autovacuum's runs are counted elsewhere)
    assert _last_analyze(runtime) == before
    # Given a bulk import
    bulk = tmp_path / "bulk.csv"
    bulk.write_text("\n".join(unique_email("bulk") for _ in range(ANALYZE_AFTER)) + "\n")
    assert import_csv(runtime, bulk, console=quiet).added == ANALYZE_AFTER
    # Then the statistics were refreshed before the import returned
    after = _last_analyze(runtime)
    assert after is not None and (before is None or after > before)


def test_refreshing_statistics_is_postgresql_only(tmp_path: Path) -> None:
    from mailer.store.db import make_engine, refresh_statistics, upgrade
    from mailer.store.schema import suppressions

    # SQLite keeps no planner statistics unless asked; nothing is run there
    url = f"sqlite:///{tmp_path / 'stats.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        assert refresh_statistics(engine, suppressions) is False
        with engine.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
            ).scalar_one() == 0
    finally:
        engine.dispose()


@pytest.mark.postgresql_only  # the planner statistics ANALYZE refreshes are PostgreSQL's
def test_refreshing_statistics_without_tables_analyses_the_whole_database(
    runtime: Any,
) -> None:
    from mailer.store.db import refresh_statistics

    # Given the statistics as they stand
    before = _last_analyze(runtime)
    # When they are refreshed with no table named
    assert refresh_statistics(runtime.engine) is True
    # Then every table was analysed, the suppression list among them
    after = _last_analyze(runtime)
    assert after is not None and (before is None or after > before)
