"""Body size limits of the webhook sources, checked before any verification work."""

from __future__ import annotations

from mailer.webhooks._support.errors import BodyTooLarge

#: Largest JSON webhook body accepted (SendGrid batches stay far below it).
MAX_BODY = 1024 * 1024
#: Largest DSN/ARF body accepted: reports may attach the whole original message.
MAX_DSN_BODY = 5 * 1024 * 1024


def check_size(body: bytes, limit: int) -> None:
    """Raise BodyTooLarge when ``body`` exceeds ``limit`` bytes."""
    if len(body) > limit:
        raise BodyTooLarge(f"body larger than {limit} bytes")
