"""The errors a webhook source raises; each carries the HTTP status the caller answers with."""

from __future__ import annotations

from mailer.errors import MailerError


class WebhookError(MailerError):
    """Base class of every error raised while verifying or parsing a webhook."""

    #: HTTP status the web layer answers with.
    status = 400


class VerificationFailed(WebhookError):
    """Raised when a request is not proven to come from the provider (HTTP 401)."""

    status = 401


class Replayed(VerificationFailed):
    """Raised for an authentic request that is stale or whose one-time token was already used."""


class ParseError(WebhookError):
    """Raised when an authentic body cannot be understood (HTTP 400)."""

    status = 400


class BodyTooLarge(ParseError):
    """Raised when a body exceeds the source's size limit (HTTP 413)."""

    status = 413


class NotConfigured(WebhookError):
    """Raised for an unknown source or one whose ``MAILER_*`` variables are unset (HTTP 404)."""

    status = 404


class CertificateUnavailable(WebhookError):
    """Raised when the SNS signing certificate cannot be fetched now (HTTP 503, so SNS retries)."""

    status = 503
