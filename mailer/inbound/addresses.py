"""The addresses of the inbound domain: VERP bounce addresses and ``mailto:`` unsubscribes.

``bounces+TOKEN@domain`` is the envelope sender of each message (SPEC 6): TOKEN names the
message's row, so a bounce in any format, even one that names nobody, is tied to exactly
that message and its recipient. ``unsubscribe+TOKEN@domain`` is the ``mailto:`` of a
promotion's ``List-Unsubscribe`` (RFC 2369): TOKEN names the recipient and the topic, like
the ``/u/`` link does, and is honoured whatever the subject and body (RFC 8058 3.2).

Tokens are lower-case base32 with a truncated HMAC: some MTAs lower-case the local part
of the address they bounce to, and RFC 5321 4.5.3.1.1 limits a local part to 64
characters, so the token must be short and survive a change of case. They carry no
address, only ids, and are verified with the current or any older secret key, so mail
sent before a key rotation still finds its way back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

#: Bytes of HMAC-SHA256 kept: 64 bits cannot be guessed by mailing us (every guess is one
#: SMTP transaction), and they cost 13 characters.
MAC_BYTES = 8
#: Bytes of the topic's keyed digest in an unsubscribe token: enough to tell the topics of
#: one installation apart, and no topic name (up to 64 characters) in the local part.
TOPIC_TAG_BYTES = 4

_MAC_CHARS = 13  # base32 of 8 bytes, unpadded
_ROW_ID = re.compile(r"[0-9a-f]{32}")
_TOKEN = re.compile(r"[a-z2-7]{14,60}")


class Mailbox(StrEnum):
    """The mailboxes of the inbound domain (SPEC 12)."""

    BOUNCES = "bounces"
    UNSUBSCRIBE = "unsubscribe"
    FBL = "fbl"
    POSTMASTER = "postmaster"


@dataclass(frozen=True)
class Target:
    """What one recipient address at the inbound domain names."""

    mailbox: Mailbox
    #: The message row a ``bounces+`` token names.
    message_id: str | None = None
    #: The profile and the topic's tag an ``unsubscribe+`` token names.
    recipient_id: int | None = None
    topic_tag: bytes | None = None
    #: The secret that signed the token: topic tags are compared under the same key.
    key: bytes | None = None


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _unb32(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


class InboundAddresses:
    """Mints and reads the addresses of ``domain``; signs with the first of ``secrets``."""

    def __init__(self, domain: str, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one secret key is required")
        self.domain = domain.lower()
        self._keys = [s.encode() for s in secrets]

    @classmethod
    def from_keys(cls, domain: str, current: str, older: Iterable[str] = ()) -> InboundAddresses:
        """Sign with ``current``; also accept tokens signed with any of ``older``."""
        return cls(domain, [current, *older])

    @staticmethod
    def _mac(key: bytes, purpose: bytes, payload: bytes) -> bytes:
        # Domain-separated per purpose: a bounce token is never a valid unsubscribe token.
        return hmac.new(key, b"mailer-inbound:" + purpose + b":" + payload,
                        hashlib.sha256).digest()[:MAC_BYTES]

    @staticmethod
    def topic_tag(key: bytes, topic: str) -> bytes:
        """The keyed digest that stands for ``topic`` in an unsubscribe token."""
        return hmac.new(key, b"mailer-topic:" + topic.encode(), hashlib.sha256).digest()[
            :TOPIC_TAG_BYTES]

    def bounce_address(self, message_id: str) -> str | None:
        """``bounces+TOKEN@domain`` for a message row id; None for an id we cannot encode."""
        if not _ROW_ID.fullmatch(message_id):
            return None
        payload = bytes.fromhex(message_id)
        token = _b32(payload) + _b32(self._mac(self._keys[0], b"b", payload))
        return f"{Mailbox.BOUNCES.value}+{token}@{self.domain}"

    def unsubscribe_address(self, recipient_id: int, topic: str) -> str:
        """``unsubscribe+TOKEN@domain`` naming a profile and a topic."""
        if recipient_id < 0:
            raise ValueError("recipient ids are not negative")
        payload = self.topic_tag(self._keys[0], topic) + recipient_id.to_bytes(
            max(1, (recipient_id.bit_length() + 7) // 8), "big")
        token = _b32(payload) + _b32(self._mac(self._keys[0], b"u", payload))
        return f"{Mailbox.UNSUBSCRIBE.value}+{token}@{self.domain}"

    def read(self, address: str) -> Target | None:
        """What ``address`` names, or None: another domain, another mailbox, a bad token.

        Local parts are compared without regard to case (tokens are lower-case base32),
        and a bare ``postmaster`` is the postmaster of this domain (RFC 5321 4.1.1.3).
        """
        text = address.strip().strip("<>").strip()
        local, at, domain = text.rpartition("@")
        if not at:
            local, domain = text, self.domain
        if domain.rstrip(".").lower() != self.domain or not local or len(local) > 64:
            return None
        local = local.lower()
        if local in (Mailbox.FBL.value, Mailbox.POSTMASTER.value):
            return Target(Mailbox(local))
        name, plus, token = local.partition("+")
        if not plus or not _TOKEN.fullmatch(token):
            return None
        if name == Mailbox.BOUNCES.value:
            return self._read_bounce(token)
        if name == Mailbox.UNSUBSCRIBE.value:
            return self._read_unsubscribe(token)
        return None

    def _verified(self, purpose: bytes, token: str) -> tuple[bytes, bytes] | None:
        """The payload and the key that signed it, or None when no key did."""
        body, mac_text = token[:-_MAC_CHARS], token[-_MAC_CHARS:]
        try:
            payload, mac = _unb32(body), _unb32(mac_text)
        except ValueError:
            return None
        # Re-encode and compare: base32 decoding ignores spare low bits of the last
        # character, and a token must have one spelling only.
        if _b32(payload) != body or _b32(mac) != mac_text:
            return None
        found = None
        for key in self._keys:
            # Constant-time, and every key is tried: timing must not say which one matched.
            if hmac.compare_digest(mac, self._mac(key, purpose, payload)) and found is None:
                found = key
        return None if found is None else (payload, found)

    def _read_bounce(self, token: str) -> Target | None:
        verified = self._verified(b"b", token)
        if verified is None or len(verified[0]) != 16:
            return None
        return Target(Mailbox.BOUNCES, message_id=verified[0].hex())

    def _read_unsubscribe(self, token: str) -> Target | None:
        verified = self._verified(b"u", token)
        if verified is None or len(verified[0]) <= TOPIC_TAG_BYTES:
            return None
        payload, key = verified
        return Target(Mailbox.UNSUBSCRIBE,
                      recipient_id=int.from_bytes(payload[TOPIC_TAG_BYTES:], "big"),
                      topic_tag=payload[:TOPIC_TAG_BYTES], key=key)

    def topic_for(self, target: Target, names: Iterable[str]) -> str | None:
        """The topic among ``names`` whose tag the unsubscribe ``target`` carries."""
        if target.topic_tag is None or target.key is None:
            return None
        for name in names:
            if hmac.compare_digest(self.topic_tag(target.key, name), target.topic_tag):
                return name
        return None
