"""``mailer keys``: create, list and revoke API keys (SPEC 7, 11)."""

from __future__ import annotations

import argparse
import json
import sys

from mailer.cli.parsing import Subcommands
from mailer.config import Settings


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create an API key and print only the key on stdout."""
    from mailer.keys import create_key
    from mailer.store.db import make_engine

    engine = make_engine(Settings.from_environ(require_secret=False).database_url)
    with engine.begin() as conn:
        key = create_key(conn, args.name, args.scope)
    print(key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Print every key (never the key itself): one line each, or JSON with ``--json``."""
    from redis import Redis

    from mailer.keys import KeyUsage, list_keys
    from mailer.store.db import make_engine

    settings = Settings.from_environ(require_secret=False)
    with make_engine(settings.database_url).connect() as conn:
        records = list_keys(conn)
    # Last use lives in Redis (mailer.keys.KeyUsage); without Redis it shows as unknown.
    usage = KeyUsage(Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                    socket_timeout=2))
    used = usage.last_used(r.id for r in records)
    items = [r.as_json(used.get(r.id)) for r in records]
    if args.json:
        print(json.dumps({"items": items}, indent=2))
        return 0
    header = ("ID", "NAME", "SCOPES", "CREATED", "LAST USED", "REVOKED")
    rows = [(str(i["id"]), i["name"], ",".join(i["scopes"]), i["created_at"] or "-",
             i["last_used_at"] or "-", i["revoked_at"] or "-") for i in items]
    widths = [max(len(line[n]) for line in [header, *rows]) for n in range(len(header))]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
              .rstrip())
    print(f"{len(items)} key(s), {sum(1 for r in records if r.revoked_at)} revoked "
          "(times in UTC)", file=sys.stderr)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke one key by id: it answers 401 from its next request on."""
    from mailer.keys import revoke_key
    from mailer.store.db import make_engine
    from mailer.times import iso, utcnow

    engine = make_engine(Settings.from_environ(require_secret=False).database_url)
    with engine.begin() as conn:
        record = revoke_key(conn, args.id, utcnow())
    print(f"key {record.id} ({record.name}) revoked at {iso(record.revoked_at)}",
          file=sys.stderr)
    return 0


def add_commands(sub: Subcommands) -> None:
    """Register ``mailer keys create|list|revoke``."""
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key; prints only the key")
    create.add_argument("name")
    create.add_argument("--scope", action="append", required=True,
                        help="messages:transactional, messages:legal, marketing, recipients, "
                             "admin (repeat for several)")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="every key, revoked ones with their revoked time")
    listing.add_argument("--json", action="store_true", help="print GET /v1/keys's JSON")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (see `mailer keys list`)")
    revoke.add_argument("id", type=int, help="the key's id")
    revoke.set_defaults(func=cmd_keys_revoke)
