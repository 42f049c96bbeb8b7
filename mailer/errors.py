"""The exceptions callers of :mod:`mailer` must act on; suppression is not one of them."""

from __future__ import annotations

from typing import Any


class MailerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MailerError):
    """Raised when a ``MAILER_*`` variable is missing or malformed."""


class RequestError(MailerError):
    """Raised for caller input that the API answers with a 4xx error body."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code


class ValidationFailed(RequestError):
    """Raised when input is well-formed JSON but breaks a rule (HTTP 422)."""

    status = 422
    code = "validation_error"


class InvalidAddress(ValidationFailed):
    """Raised when an email address does not validate."""

    code = "invalid_address"


class HeaderInjection(ValidationFailed):
    """Raised when a header value holds a control character, raw or RFC 2047-encoded."""

    code = "invalid_header"


class TemplateError(ValidationFailed):
    """Raised for an unknown template, a missing variable or a template that will not render."""

    code = "template_error"


class Forbidden(RequestError):
    """Raised when the API key lacks the scope the request needs (HTTP 403)."""

    status = 403
    code = "forbidden"


class NotFound(RequestError):
    """Raised when the named object does not exist (HTTP 404)."""

    status = 404
    code = "not_found"


class Conflict(RequestError):
    """Raised for idempotency and consent conflicts (HTTP 409)."""

    status = 409
    code = "conflict"


class Unauthorized(RequestError):
    """Raised for a missing or unknown API key or a failed signature (HTTP 401)."""

    status = 401
    code = "unauthorized"
