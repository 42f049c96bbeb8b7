"""Every 4xx carries the SPEC's body: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailer.errors import RequestError

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited"}


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON error response in the SPEC's shape."""
    return JSONResponse(
        {"error": {"code": code, "message": message, "details": details}},
        status_code=status,
        headers=headers,
    )


def _clean(errors: list[Any]) -> list[dict[str, Any]]:
    # Pydantic echoes the offending input; that may be an address or a body, which must
    # not travel back into logs and proxies: keep only where and what.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in errors]


def where(exc: BaseException, frames: int = 4) -> str:
    """The innermost ``frames`` code locations of ``exc``'s traceback, without any values."""
    stack = traceback.extract_tb(exc.__traceback__)[-frames:]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack))


def install(app: FastAPI) -> None:
    """Register the handlers that turn errors into the SPEC's body."""

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_json", "the body is not valid JSON")
        return error_response(422, "validation_error", "the request does not match the schema",
                              _clean(list(errors)))

    @app.exception_handler(ValidationError)
    async def _model(_: Request, exc: ValidationError) -> JSONResponse:
        # A model built from request data inside a handler (not by FastAPI) that does not
        # validate: still the caller's input, so a 422 like any other schema mismatch.
        return error_response(422, "validation_error", "the request does not match the schema",
                              _clean(list(exc.errors())))

    @app.exception_handler(DataError)
    async def _unstorable(_: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the checks before it let through (PostgreSQL: NUL
        # in text, a string over its column's length, a number out of range). The
        # transaction was rolled back, so nothing was half written; the value was input.
        log.warning("database refused a value: %s", type(exc.orig).__name__)
        return error_response(422, "unstorable_value", "a value in the request cannot be stored")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), None,
                              dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The type, the route's pattern and where it was raised, but never the exception's
        # text nor the request path: a database error quotes its parameters and a parser
        # quotes its input, and either may be an address, a token or a body (logs carry
        # no personal data).
        route = getattr(request.scope.get("route"), "path", "?")
        log.error("unhandled %s in %s %s at %s", type(exc).__name__, request.method, route,
                  where(exc))
        return error_response(500, "internal_error", "something went wrong on our side")
