"""``mailer send``: accept one message from the shell."""

from __future__ import annotations

import argparse
import json

from mailer.cli.parsing import Subcommands
from mailer.config import Settings
from mailer.errors import MailerError


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
    rt = Runtime.from_settings(Settings.from_environ())
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


def add_commands(sub: Subcommands) -> None:
    """Register ``mailer send``."""
    send = sub.add_parser("send", help="enqueue one message")
    send.add_argument("--template", required=True)
    send.add_argument("--to", required=True)
    send.add_argument("--name")
    send.add_argument("--external-id")
    send.add_argument("--data", help="template variables as a JSON object")
    send.add_argument("--topic")
    send.add_argument("--send-at", help="ISO 8601 time with zone")
    send.set_defaults(func=cmd_send)
