"""Verify the signature of an event webhook we sent (SPEC 13, the Standard Webhooks scheme).

The sender signs ``"{webhook-id}.{webhook-timestamp}.{body}"`` with HMAC-SHA256, keyed by the
base64-decoded part of the endpoint's secret after ``whsec_``, and sends
``webhook-signature: v1,<base64>``, possibly several space-separated entries while a secret
is being rotated: any one that matches is enough. The timestamp bounds how long a captured
request can be replayed. Pure: takes ``(headers, body)`` and a clock value, does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from mailer.client.errors import WebhookVerificationError

#: How far (seconds) a webhook's timestamp may be from our clock, either way.
DEFAULT_TOLERANCE = 300
#: Prefix of the secrets the API hands out at endpoint registration.
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def _key(secret: str | bytes) -> bytes:
    """The HMAC key: raw bytes as given, else the base64 after an optional ``whsec_``."""
    if isinstance(secret, bytes):
        return secret
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookVerificationError("the secret is not whsec_ followed by base64") from exc
    if not key:
        raise WebhookVerificationError("the secret is empty")
    return key


def _header(headers: Mapping[str, str], name: str) -> str:
    # HTTP field names are case-insensitive (RFC 9110 section 5.1); a plain dict may hold
    # any spelling, while httpx's and Starlette's header maps already ignore case.
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if not value:
        raise WebhookVerificationError(f"the {name} header is missing")
    return value


def sign(secret: str | bytes, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` value (one ``v1,`` entry) for these parts."""
    raw = body.encode() if isinstance(body, str) else body
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + raw, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def verify_webhook(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """Check an event webhook's signature and age; return its parsed JSON body.

    ``body`` must be the request body exactly as received (re-serialised JSON would not
    match). Raises :class:`WebhookVerificationError` for a missing header, a timestamp more
    than ``tolerance`` seconds from ``now`` (default: the current time), a signature that
    does not match, or a body that is not a JSON object.
    """
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not stamp.isascii() or not stamp.isdigit():
        raise WebhookVerificationError("the webhook-timestamp header is not Unix seconds")
    timestamp = int(stamp)
    current = time.time() if now is None else now
    # Both directions: a timestamp from the future is as suspect as a stale one.
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError("the webhook-timestamp is outside the tolerance")
    raw = body.encode() if isinstance(body, str) else body
    expected = sign(secret, msg_id, timestamp, raw).encode("ascii")
    matched = False
    for entry in signatures.split(" "):
        # Compare every v1 entry in constant time, and do not stop at the first match, so
        # the time taken says nothing about which entry (or which byte) matched.
        if entry.startswith("v1,"):
            matched |= hmac.compare_digest(entry.encode("ascii", "replace"), expected)
    if not matched:
        raise WebhookVerificationError("no webhook-signature entry matches")
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise WebhookVerificationError("the signed body is not JSON") from exc
    if not isinstance(payload, dict):
        raise WebhookVerificationError("the signed body is not a JSON object")
    return payload
