"""Signed, non-expiring tokens for unsubscribe, preference and confirmation links.

A token names a purpose, a recipient id and a topic, never the address (itsdangerous-style
payloads are readable by anyone, so we put nothing personal in them). It carries the id of
the key that signed it, so keys can rotate and links in old mail keep working (CAN-SPAM:
an opt-out must work for at least 30 days; we never expire them).

A token also binds the address the mail was sent to, as a short digest of that address's
keyed hash made with the signing key (not the address, nor its stored hash). Links can
always take consent away, but may grant it only for the address they were mailed to
(SPEC 3, "Consent belongs to an address"): the pages compare the binding with the
profile's current address before any grant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from mailer.errors import MailerError

#: Token purposes: unsubscribe, preference centre, double opt-in confirmation.
PURPOSES = frozenset({"u", "p", "c"})

_SIG_BYTES = 16  # 128-bit MAC: far beyond guessing, keeps links short
#: 72 bits: two addresses never share a binding by chance, and it adds 12 characters.
_BINDING_BYTES = 9


class BadToken(MailerError):
    """Raised when a token is malformed, forged or signed by an unknown key."""


@dataclass(frozen=True)
class Token:
    """What a valid token says."""

    purpose: str
    recipient_id: int
    topic: str
    #: The id of the key that signed it (the address binding is made with that key).
    key_id: str = ""
    #: The digest of the address the link was mailed to. None for tokens minted before
    #: links were bound to an address: nothing says where such a mail went, so those
    #: links are revoke-only (they unsubscribe, never grant).
    address: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(secret: str) -> str:
    """A short public name for a signing key, derived from it."""
    return hashlib.sha256(b"mailer-key-id:" + secret.encode()).hexdigest()[:8]


class TokenSigner:
    """Signs with the current key; verifies with the current or any older key."""

    def __init__(self, current: str, older: Sequence[str] = ()) -> None:
        self._current_id = key_id(current)
        self._keys = {key_id(k): k.encode() for k in (*older, current)}

    def _mac(self, kid: str, payload: str) -> bytes:
        message = f"{kid}.{payload}".encode()
        return hmac.new(self._keys[kid], message, hashlib.sha256).digest()[:_SIG_BYTES]

    def _binding(self, kid: str, email_hash: str) -> str:
        # Domain-separated from the signature MAC, so a binding is never a valid signature.
        message = b"mailer-address:" + email_hash.encode()
        return _b64(hmac.new(self._keys[kid], message, hashlib.sha256).digest()[:_BINDING_BYTES])

    def sign(
        self, purpose: str, recipient_id: int, topic: str = "", email_hash: str | None = None
    ) -> str:
        """Return the token for this purpose, recipient and topic, bound to ``email_hash``.

        ``email_hash`` is the keyed hash of the address the link is mailed to; without it
        the token is revoke-only, like one minted before links were bound to addresses.
        """
        if purpose not in PURPOSES:
            raise ValueError(f"unknown token purpose {purpose!r}")
        fields = f"{purpose}:{recipient_id}:{topic}"
        if email_hash is not None:
            fields += ":" + self._binding(self._current_id, email_hash)
        payload = _b64(fields.encode())
        return f"{self._current_id}.{payload}.{_b64(self._mac(self._current_id, payload))}"

    def mailed_to(self, token: Token, email_hash: str) -> bool:
        """Whether ``token`` was minted for the address with this keyed hash.

        False for a token without a binding (minted before bindings existed: revoke-only).
        """
        if token.address is None or token.key_id not in self._keys:
            return False
        expected = self._binding(token.key_id, email_hash)
        return hmac.compare_digest(token.address.encode(), expected.encode())

    def verify(self, token: str, purpose: str) -> Token:
        """Return what the token says, or raise :class:`BadToken`."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] not in self._keys or len(token) > 400:
            raise BadToken("malformed token")
        kid, payload, signature = parts
        # Compare the encoded text, not decoded bytes: base64 decoding ignores the spare
        # low bits of the last character, so two spellings could decode alike.
        if not hmac.compare_digest(signature.encode(), _b64(self._mac(kid, payload)).encode()):
            raise BadToken("bad signature")
        try:
            fields = _unb64(payload).decode().split(":")
        except (ValueError, UnicodeDecodeError):
            raise BadToken("malformed token") from None
        # Three fields: a token from before address binding (revoke-only); four: bound.
        if len(fields) not in (3, 4) or fields[0] != purpose or not fields[1].isdigit():
            raise BadToken("token is not for this page")
        address = fields[3] if len(fields) == 4 else None
        if address is not None and not address:
            raise BadToken("malformed token")
        return Token(purpose=fields[0], recipient_id=int(fields[1]), topic=fields[2],
                     key_id=kid, address=address)
