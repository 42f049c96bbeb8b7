"""Webhook configuration, read once from ``Settings.webhooks`` (SPEC sections 8 and 10)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

from mailer.errors import ConfigError
from mailer.webhooks._support.replay import MemorySeenTokens, SeenTokens
from mailer.webhooks._support.sns import fetch_certificate

if TYPE_CHECKING:
    from mailer.config import Settings


def load_sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    """Load SendGrid's verification key: base64 DER as its console shows it, or PEM."""
    try:
        if "-----BEGIN" in text:
            key = load_pem_public_key(text.encode("ascii"))
        else:
            key = load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
    except (ValueError, TypeError, UnicodeEncodeError, binascii.Error):
        raise ConfigError("MAILER_SENDGRID_PUBLIC_KEY is not a public key") from None
    # SendGrid signs with ECDSA P-256; any other key can only be a paste mistake.
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("MAILER_SENDGRID_PUBLIC_KEY is not an ECDSA P-256 key")
    return key


@dataclass(frozen=True)
class WebhookConfig:
    """Secrets and collaborators of the webhook sources; a source left at None is refused."""

    sendgrid_public_key: ec.EllipticCurvePublicKey | None = None
    # Secrets stay out of repr() so a logged config or traceback never shows them.
    mailgun_signing_key: str | None = field(default=None, repr=False)
    postmark_user: str | None = None
    postmark_password: str | None = field(default=None, repr=False)
    dsn_token: str | None = field(default=None, repr=False)
    ses_topic_arns: frozenset[str] = frozenset()
    sns_cert_dir: Path | None = None
    #: Fetches an SNS signing certificate by URL when it is not in ``sns_cert_dir``.
    fetch_cert: Callable[[str], bytes] = fetch_certificate
    #: Remembers Mailgun tokens; the default only protects a single process.
    seen_tokens: SeenTokens = field(default_factory=MemorySeenTokens)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        seen_tokens: SeenTokens | None = None,
        fetch_cert: Callable[[str], bytes] | None = None,
    ) -> WebhookConfig:
        """Build from ``settings.webhooks``; raise ConfigError for a malformed value."""
        return cls.from_mapping(settings.webhooks, seen_tokens=seen_tokens, fetch_cert=fetch_cert)

    @classmethod
    def from_mapping(
        cls,
        values: Mapping[str, str],
        *,
        seen_tokens: SeenTokens | None = None,
        fetch_cert: Callable[[str], bytes] | None = None,
    ) -> WebhookConfig:
        """Build from variable names lower-cased without ``MAILER_`` (``dsn_webhook_token``)."""

        def get(name: str) -> str | None:
            value = values.get(name)
            return value if value else None

        key_text = get("sendgrid_public_key")
        cert_dir = get("sns_cert_dir")
        arns = frozenset(a.strip() for a in (get("ses_topic_arns") or "").split(",") if a.strip())
        return cls(
            sendgrid_public_key=load_sendgrid_key(key_text) if key_text else None,
            mailgun_signing_key=get("mailgun_signing_key"),
            postmark_user=get("postmark_webhook_user"),
            postmark_password=get("postmark_webhook_password"),
            dsn_token=get("dsn_webhook_token"),
            ses_topic_arns=arns,
            sns_cert_dir=Path(cert_dir) if cert_dir else None,
            fetch_cert=fetch_cert or fetch_certificate,
            seen_tokens=seen_tokens if seen_tokens is not None else MemorySeenTokens(),
        )

    def configured(self) -> frozenset[str]:
        """Names of the sources whose variables are set."""
        names = {
            "ses": bool(self.ses_topic_arns),
            "sendgrid": self.sendgrid_public_key is not None,
            "mailgun": self.mailgun_signing_key is not None,
            "postmark": self.postmark_user is not None and self.postmark_password is not None,
            "dsn": self.dsn_token is not None,
        }
        return frozenset(name for name, ok in names.items() if ok)
