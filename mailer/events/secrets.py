"""Endpoint signing secrets: made once, shown once, kept sealed (SPEC 13).

The secret cannot be stored as a hash the way API keys are: every delivery computes an
HMAC with it, so the server needs the secret itself. It is kept encrypted instead
(AES-256-GCM) under a key derived from ``MAILER_SECRET_KEY``, which lives in the
environment and never in the database: a leaked dump or backup alone does not let anyone
forge events to the services' receivers. The endpoint's id is the associated data, so a
sealed secret copied onto another endpoint's row does not open. Keys in
``MAILER_OLD_SECRET_KEYS`` still open secrets sealed before a rotation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mailer.client.signatures import SECRET_PREFIX
from mailer.config import Settings
from mailer.errors import MailerError

#: Random bytes in a secret: 192 bits, as the Standard Webhooks reference uses.
SECRET_BYTES = 24
#: Version tag of the sealed form, so the scheme can change without guessing.
_SEALED_PREFIX = "v1."
_NONCE_BYTES = 12
#: Domain separation: this key is used for nothing else derived from MAILER_SECRET_KEY.
_PURPOSE = b"mailer/webhook-endpoint-secret/v1"


class SecretUnreadable(MailerError):
    """Raised when a sealed secret opens under none of the configured keys."""


def new_secret() -> str:
    """A new endpoint secret: ``whsec_`` and the base64 of :data:`SECRET_BYTES` random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode("ascii")


def _derive(secret_key: str) -> bytes:
    return hmac.new(secret_key.encode(), _PURPOSE, hashlib.sha256).digest()


class SecretBox:
    """Seals secrets under the current key and opens them under the current or an old one."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._keys = [AESGCM(_derive(k)) for k in keys]

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The box for ``MAILER_SECRET_KEY`` (sealing) and ``MAILER_OLD_SECRET_KEYS``."""
        return cls([settings.secret_key, *settings.old_secret_keys])

    def seal(self, secret: str, endpoint_id: str) -> str:
        """The stored form of ``secret`` for the endpoint ``endpoint_id``."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[0].encrypt(nonce, secret.encode(), endpoint_id.encode())
        return _SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, endpoint_id: str) -> str:
        """The secret ``sealed`` holds; :class:`SecretUnreadable` when no key opens it."""
        if not sealed.startswith(_SEALED_PREFIX):
            raise SecretUnreadable("not a sealed secret")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(_SEALED_PREFIX):])
        except (binascii.Error, ValueError):
            raise SecretUnreadable("not a sealed secret") from None
        nonce, ciphertext = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        if len(nonce) != _NONCE_BYTES or not ciphertext:
            raise SecretUnreadable("not a sealed secret")
        for key in self._keys:
            try:
                return key.decrypt(nonce, ciphertext, endpoint_id.encode()).decode()
            except InvalidTag:
                continue
        raise SecretUnreadable("sealed under a key no longer configured "
                               "(keep the old one in MAILER_OLD_SECRET_KEYS)")
