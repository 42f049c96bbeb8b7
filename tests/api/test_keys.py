"""API keys (SPEC 7, 11): listing, revoking, last use, and ``mailer keys list|revoke``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.cli.test_cli import mailer, one_line_error
from tests.conftest import auth

FIELDS = {"id", "name", "scopes", "created_at", "last_used_at", "revoked_at"}


def listed(client: Any, admin: str) -> dict[str, dict[str, Any]]:
    """GET /v1/keys as ``{name: item}`` (the test keys have unique names per call)."""
    r = client.get("/v1/keys", headers=auth(admin))
    assert r.status_code == 200, r.text
    return {item["name"]: item for item in r.json()["items"]}


def key_id(client: Any, admin: str, secret: str, runtime: Any) -> int:
    """The id of the key ``secret`` (looked up the way authentication does)."""
    from mailer.keys import authenticate

    with runtime.engine.connect() as conn:
        found = authenticate(conn, secret)
    assert found is not None
    return found.id


def make_key(runtime: Any, name: str, scopes: list[str]) -> str:
    """A fresh key."""
    from mailer.keys import create_key

    with runtime.engine.begin() as conn:
        return create_key(conn, name, scopes)


def test_keys_are_listed_without_their_secret(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a fresh key nobody used yet
    name = f"listed-{datetime.now(UTC).timestamp()}"
    secret = make_key(runtime, name, ["marketing", "recipients"])
    # When an admin lists the keys
    r = client.get("/v1/keys", headers=auth(keys["admin"]))
    # Then it is there with its scopes and times, never used, not revoked
    assert r.status_code == 200
    item = {i["name"]: i for i in r.json()["items"]}[name]
    assert set(item) == FIELDS
    assert item["scopes"] == ["marketing", "recipients"]
    assert item["last_used_at"] is None and item["revoked_at"] is None
    assert abs(datetime.fromisoformat(item["created_at"]) - datetime.now(UTC)) < timedelta(
        minutes=1)
    # And no key, hash or prefix of one appears anywhere in the answer
    body = r.text
    for key in [secret, *keys.values()]:
        prefix = key.split("_")[1]
        assert key not in body and prefix not in body
    assert "hash" not in body
    # And listing needs admin
    assert client.get("/v1/keys", headers=auth(keys["recipients"])).status_code == 403


def test_last_used_is_recorded_at_most_once_a_minute(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    from mailer.keys import LAST_USED_HASH

    # Given a fresh key
    name = f"used-{datetime.now(UTC).timestamp()}"
    secret = make_key(runtime, name, ["recipients"])
    ident = key_id(client, keys["admin"], secret, runtime)
    assert listed(client, keys["admin"])[name]["last_used_at"] is None
    # When it is used
    before = datetime.now(UTC)
    assert client.get("/v1/topics", headers=auth(secret)).status_code == 200
    # Then its last use is now
    used = listed(client, keys["admin"])[name]["last_used_at"]
    assert used is not None
    assert before - timedelta(seconds=1) <= datetime.fromisoformat(used) <= datetime.now(UTC)
    # And using it again within the minute writes nothing
    stored = runtime.redis.hget(LAST_USED_HASH, str(ident))
    for _ in range(3):
        assert client.get("/v1/topics", headers=auth(secret)).status_code == 200
    assert runtime.redis.hget(LAST_USED_HASH, str(ident)) == stored


def test_key_usage_writes_again_after_the_interval(runtime: Any) -> None:
    from mailer.keys import LAST_USED_HASH, KeyUsage

    # Given a usage record with a clock we move by hand
    now = [1000.0]
    usage = KeyUsage(runtime.redis, interval=60.0, monotonic=lambda: now[0])
    ident = 2_000_000_000 - int(datetime.now(UTC).timestamp())  # no real key has this id
    t0 = datetime(2031, 1, 1, 12, tzinfo=UTC)
    # When the key is used, again 30 s later, and again 61 s after the first
    assert usage.touch(ident, t0)
    now[0] += 30
    assert not usage.touch(ident, t0 + timedelta(seconds=30))
    assert usage.last_used([ident]) == {ident: t0}
    now[0] += 31
    assert usage.touch(ident, t0 + timedelta(seconds=61))
    # Then the stored time is the last written one
    assert usage.last_used([ident, ident + 1]) == {ident: t0 + timedelta(seconds=61)}
    runtime.redis.hdel(LAST_USED_HASH, str(ident))


def test_a_revoked_key_answers_401_from_then_on(
    client: Any, keys: dict[str, str], runtime: Any
) -> None:
    # Given a key in use
    name = f"revoked-{datetime.now(UTC).timestamp()}"
    secret = make_key(runtime, name, ["recipients"])
    assert client.get("/v1/topics", headers=auth(secret)).status_code == 200
    ident = listed(client, keys["admin"])[name]["id"]
    # When an admin revokes it
    r = client.delete(f"/v1/keys/{ident}", headers=auth(keys["admin"]))
    # Then 204, and the key is refused with 401 and the error body
    assert r.status_code == 204 and r.content == b""
    refused = client.get("/v1/topics", headers=auth(secret))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    # And the listing shows when it was revoked; revoking again keeps that time
    revoked_at = listed(client, keys["admin"])[name]["revoked_at"]
    assert revoked_at is not None
    assert client.delete(f"/v1/keys/{ident}", headers=auth(keys["admin"])).status_code == 204
    assert listed(client, keys["admin"])[name]["revoked_at"] == revoked_at
    # And an unknown id is 404, a malformed one 422, a non-admin caller 403
    assert client.delete("/v1/keys/2000000000", headers=auth(keys["admin"])).status_code == 404
    assert client.delete("/v1/keys/abc", headers=auth(keys["admin"])).status_code == 422
    assert client.delete("/v1/keys/99999999999", headers=auth(keys["admin"])).status_code == 422
    other = listed(client, keys["admin"])["test-marketing"]["id"]
    assert client.delete(f"/v1/keys/{other}", headers=auth(keys["marketing"])).status_code == 403


def test_keys_list_and_revoke_from_the_shell(
    env: dict[str, str], client: Any, keys: dict[str, str], runtime: Any, tmp_path: Path
) -> None:
    # Given a key created and used through the API
    name = f"shell-{datetime.now(UTC).timestamp()}"
    secret = make_key(runtime, name, ["marketing"])
    assert client.get("/v1/campaigns", headers=auth(secret)).status_code == 200
    # When the operator lists the keys (no secret key needed, as for `keys create`)
    shell_env = {k: v for k, v in env.items() if k != "MAILER_SECRET_KEY"}
    shell_env["MAILER_ENV"] = "production"
    shown = mailer("keys", "list", env=shell_env, cwd=tmp_path)
    # Then one line per key shows the new one with its scopes and last use, no secret
    assert shown.returncode == 0, shown.stderr
    [line] = [x for x in shown.stdout.splitlines() if f" {name} " in x]
    ident = line.split()[0]
    assert "marketing" in line and line.split()[-1] == "-"  # not revoked
    assert secret not in shown.stdout and secret.split("_")[1] not in shown.stdout
    # When it is revoked from the shell
    revoked = mailer("keys", "revoke", ident, env=shell_env, cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    # Then the API refuses it, and the list marks it with its revoked time
    assert client.get("/v1/campaigns", headers=auth(secret)).status_code == 401
    as_json = mailer("keys", "list", "--json", env=shell_env, cwd=tmp_path)
    item = {i["name"]: i for i in json.loads(as_json.stdout)["items"]}[name]
    assert item["revoked_at"] is not None and item["last_used_at"] is not None
    [line] = [x for x in mailer("keys", "list", env=shell_env, cwd=tmp_path).stdout
              .splitlines() if f" {name} " in x]
    assert line.split()[-1] == item["revoked_at"]
    # And revoking an unknown id is one clear line and status 2
    assert "no API key 2000000000" in one_line_error(
        mailer("keys", "revoke", "2000000000", env=shell_env, cwd=tmp_path))
