"""What route handlers share: the process's runtime, the API key, a caller's address."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from mailer.errors import Forbidden, InvalidAddress, Unauthorized
from mailer.keys import ApiKey, authenticate
from mailer.runtime import Runtime
from mailer.store.recipients import Address
from suppression.addresses import InvalidAddressError


def runtime(request: Request) -> Runtime:
    """The process's runtime, set on the app at start-up."""
    rt: Runtime = request.app.state.runtime
    return rt


def api_key(request: Request) -> ApiKey:
    """Authenticate ``Authorization: Bearer <key>``; 401 when missing or unknown."""
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    with runtime(request).engine.connect() as conn:
        key = authenticate(conn, presented.strip())
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    return key


def scoped(*scopes: str) -> Callable[[Request], ApiKey]:
    """A dependency that needs one of ``scopes`` (``admin`` always passes); 403 otherwise."""

    def dependency(request: Request) -> ApiKey:
        key = api_key(request)
        if not any(key.allows(s) for s in scopes):
            raise Forbidden(f"this key lacks the scope {' or '.join(scopes)}")
        return key

    return dependency


def parse_address(rt: Runtime, raw: str) -> Address:
    """Validate a caller's address; :class:`InvalidAddress` (422) when it does not."""
    try:
        return rt.address(raw)
    except InvalidAddressError as exc:
        raise InvalidAddress(f"invalid address: {exc}") from None
