"""What route handlers share: the process's runtime, the API key, a caller's address."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mailer.errors import Forbidden, InvalidAddress, Unauthorized
from mailer.keys import ApiKey, authenticate
from mailer.runtime import Runtime
from mailer.store.recipients import Address
from suppression.addresses import InvalidAddressError


def app_runtime(request: Request) -> Runtime:
    """The process's runtime, set on the app at start-up."""
    rt: Runtime = request.app.state.runtime
    return rt


async def runtime(request: Request) -> Runtime:
    """:func:`app_runtime` as a dependency. ``async`` because FastAPI runs a plain ``def``
    dependency in its thread pool: one thread hand-off per request for an attribute read."""
    return app_runtime(request)


#: Declares the bearer scheme in the OpenAPI document (SPEC 7); it never answers by itself
#: (``auto_error=False``), so a missing key gets our error body, not FastAPI's.
bearer = HTTPBearer(scheme_name="bearer", auto_error=False,
                    description="An API key from `mailer keys create`: "
                                "`Authorization: Bearer mk_...`")


def api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
) -> ApiKey:
    """Authenticate ``Authorization: Bearer <key>``; 401 when missing or unknown."""
    presented = credentials.credentials.strip() if credentials is not None else ""
    if not presented:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    rt = app_runtime(request)
    with rt.engine.connect() as conn:
        key = authenticate(conn, presented)
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    # For GET /v1/keys; at most one Redis write per key and minute per process.
    rt.key_usage.touch(key.id, rt.clock())
    return key


def scoped(*scopes: str) -> Callable[..., ApiKey]:
    """A dependency that needs one of ``scopes`` (``admin`` always passes); 403 otherwise."""

    def dependency(key: Annotated[ApiKey, Depends(api_key)]) -> ApiKey:
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
