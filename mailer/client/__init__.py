"""``mailer.client``: the Python client other services use to send through mailer (SPEC 1).

::

    from mailer.client import Client

    with Client("https://mail.example.org", api_key) as mailer:
        accepted = mailer.send("registration_confirmation", "ada@example.org",
                               {"name": "Ada", "confirm_url": url})
        mailer.get_message(accepted["id"])["status"]

Each send carries an idempotency key (the caller's, or a fresh one) that its retries reuse,
so a send retried after a timeout is accepted once (SPEC 5). :func:`verify_webhook` checks
the event webhooks mailer posts back (SPEC 13). Needs only httpx, not the server's packages.
"""

from __future__ import annotations

from mailer.client.clients import DEFAULT_TIMEOUT, AsyncClient, Client
from mailer.client.errors import (
    ApiError,
    AuthenticationError,
    ConflictError,
    MailerError,
    NotFoundError,
    PermissionDenied,
    RateLimited,
    ServerError,
    TransportError,
    ValidationError,
    WebhookVerificationError,
)
from mailer.client.retry import RetryPolicy
from mailer.client.signatures import sign, verify_webhook

__all__ = [
    "DEFAULT_TIMEOUT",
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "MailerError",
    "NotFoundError",
    "PermissionDenied",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "TransportError",
    "ValidationError",
    "WebhookVerificationError",
    "sign",
    "verify_webhook",
]
