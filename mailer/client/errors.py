"""The client's error tree: one class per kind of answer a caller must act on differently.

Every API error carries the SPEC 7 body ``{"error": {"code", "message", "details"}}``; the
class says what to do (fix the request, fix the key, wait), ``code`` says exactly what.
"""

from __future__ import annotations

from typing import Any

import httpx

from mailer.errors import MailerError

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ConflictError",
    "MailerError",
    "NotFoundError",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "TransportError",
    "ValidationError",
    "WebhookVerificationError",
    "error_for",
]


class TransportError(MailerError, ConnectionError):
    """Raised when no answer came back (connection refused, timeout) after every retry."""

    def __init__(self, message: str, *, idempotency_key: str | None = None) -> None:
        super().__init__(message)
        #: The key the attempts were sent with: reuse it to retry later without a duplicate.
        self.idempotency_key = idempotency_key


class ApiError(MailerError):
    """Raised when the API answers with an error status; carries the SPEC 7 error body."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class AuthenticationError(ApiError):
    """Raised for a missing, unknown or revoked API key (401), or a missing scope (403)."""


class PermissionDenied(AuthenticationError):
    """Raised when the key is valid but lacks the scope or category the request needs (403)."""


class NotFoundError(ApiError):
    """Raised when the named object does not exist or belongs to another key (404)."""


class ConflictError(ApiError):
    """Raised for an idempotency key reused with another body, or a consent conflict (409)."""


class ValidationError(ApiError):
    """Raised when the request breaks a rule: bad address, template or header value (422)."""


class RateLimited(ApiError):
    """Raised when the API asks the caller to slow down (429); see ``retry_after``."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, code, message, details)
        #: Seconds the server asked us to wait, when it said so.
        self.retry_after = retry_after


class ServerError(ApiError):
    """Raised for a 5xx answer (after retries, for 502, 503 and 504)."""


class WebhookVerificationError(MailerError, ValueError):
    """Raised when a webhook's signature, timestamp or headers do not verify (SPEC 13)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthenticationError, 403: PermissionDenied, 404: NotFoundError,
    409: ConflictError, 422: ValidationError,
}


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds, when it is a number (RFC 9110 section 10.2.3)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None  # absent, or an HTTP date: not worth a clock comparison here
    return seconds if seconds >= 0 else None


def error_for(response: httpx.Response) -> ApiError:
    """The exception for an error ``response``, read from its SPEC 7 body when it has one."""
    status = response.status_code
    code, message, details = f"http_{status}", response.reason_phrase or "error", None
    try:
        body = response.json()
    except ValueError:
        body = None  # a proxy's HTML page, or nothing: keep the status as the code
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        details = error.get("details")
    if status == 429:
        return RateLimited(status, code, message, details, retry_after(response))
    if status >= 500:
        return ServerError(status, code, message, details)
    return _BY_STATUS.get(status, ApiError)(status, code, message, details)
