"""DKIM signing of outgoing messages (RFC 6376), covering List-Unsubscribe(-Post) (RFC 8058).

``dkim.sign`` from dkimpy does its RSA arithmetic in pure Python: 5.4 ms per 2048-bit
signature on the target machine, which alone would need four cores at 1 500 messages a
second. The signer here hands the signing step to OpenSSL through ``cryptography`` (about
0.22 ms for RSA-2048, and OpenSSL runs it without holding the GIL) and does the relaxed
canonicalisation itself, with the same result as dkimpy's ``Relaxed`` (the tests compare
them) but skipping the regular-expression passes a line does not need: dkimpy's body
canonicalisation alone took about 150 us per 5 KB message. What is the same for every
message (the tag list, the ``h=`` line, the fixed header fields such as From) is worked
out once. Signatures are checked with ``dkim.verify`` in the tests.

An Ed25519 signature (RFC 8463) can be added next to the RSA one: receivers that know
Ed25519 check it, the others ignore it and check the RSA one (RFC 8463 section 4 asks
signers to keep RSA while verifiers catch up).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from mailer.errors import ConfigError

if TYPE_CHECKING:
    from mailer.config import Settings

#: Header fields covered by ``h=``. RFC 8058 section 3.1 requires both List-Unsubscribe
#: fields to be signed, and dkimpy's default set leaves out List-Unsubscribe-Post, so the
#: list is explicit. Reply-To and Content-Type come from RFC 6376 section 5.4's
#: recommendations: a rewritten Reply-To is the classic way to hijack replies.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type",
    b"reply-to", b"list-id", b"list-unsubscribe", b"list-unsubscribe-post",
)
#: RFC 8301: keys shorter than 1024 bits must not be used (Gmail recommends 2048).
MIN_KEY_BITS = 1024

_DNS_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
# A header field ends at a CRLF that is not followed by folding white space.
_FIELD_END = re.compile(rb"\r\n(?![ \t])")
# RFC 6376 section 3.4.2 and 3.4.4 (as dkimpy reads them): a run of WSP becomes one SP.
# Runs of one SP are already canonical, so only longer runs and tabs are rewritten.
_WSP_RUN = re.compile(rb"[\t ]{2,}|\t")
_UNFOLD = re.compile(rb"\r?\n")
_LINE = 72
# Fields whose canonical form is remembered between messages: the builder writes them the
# same way every time (From, Reply-To and MIME-Version are fixed per process, List-Id and
# List-Unsubscribe-Post per topic). Per-message fields would only churn the cache.
_REPEATED_FIELDS = frozenset({
    b"from", b"reply-to", b"mime-version", b"list-id", b"list-unsubscribe-post",
})
_MAX_REMEMBERED = 256


def _fold_list(prefix: bytes, items: list[bytes], sep: bytes, space: bytes) -> bytes:
    """Join ``items`` after ``prefix``, folding (CRLF SP) before an item that would overflow."""
    lines: list[bytes] = []
    line = prefix
    for index, item in enumerate(items):
        piece = item + (sep if index < len(items) - 1 else b"")
        if index and len(line) + len(space) + len(piece) > _LINE:
            lines.append(line)
            line = b" " + piece
        else:
            line += (space if index else b"") + piece
    lines.append(line)
    return b"\r\n".join(lines)


def relaxed_header(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """The relaxed canonical form of one header field (RFC 6376 section 3.4.2).

    Lower-case name without trailing white space; value unfolded, WSP runs as one SP,
    stripped, with a CRLF: what dkimpy's ``Relaxed.canonicalize_headers`` gives.
    """
    if b"\n" in value:
        value = _UNFOLD.sub(b"", value)
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.lower().rstrip(), value.strip() + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """The relaxed canonical form of a body (RFC 6376 section 3.4.4), as dkimpy gives it.

    WSP runs become one SP, WSP at the end of a line goes, empty lines at the end go
    (one CRLF ends a non-empty body; an empty body stays empty). Compressing first and then
    dropping the single SP left before each CRLF gives what stripping first would.
    """
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    body = body.replace(b" \r\n", b"\r\n")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    while body.endswith(b"\r\n\r\n"):
        body = body[:-2]
    return b"" if body == b"\r\n" else body


def _wrap_signature(signature: bytes) -> bytes:
    encoded = base64.b64encode(signature)
    chunks = [encoded[i:i + _LINE - 1] for i in range(0, len(encoded), _LINE - 1)]
    return b"\r\n ".join(chunks) + b"\r\n"


def _load_ed25519(key: bytes) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key from PEM (``openssl genpkey -algorithm ed25519``) or dkimpy's form.

    dkimpy's ``dknewkey --ktype ed25519`` writes the 32-byte private key in base64.
    """
    try:
        loaded = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        try:
            raw = base64.b64decode(b"".join(key.split()), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ConfigError(
                "DKIM Ed25519 key is neither an unencrypted PEM key nor 32 bytes in base64"
            ) from None
        return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ConfigError("DKIM Ed25519 key must be an Ed25519 key (ed25519-sha256, RFC 8463)")
    return loaded


class DkimSigner:
    """Produces the ``DKIM-Signature`` header (or two, with Ed25519) for a finished message."""

    def __init__(
        self,
        domain: str,
        selector: str,
        private_key_pem: bytes,
        *,
        ed25519_selector: str | None = None,
        ed25519_private_key: bytes | None = None,
    ) -> None:
        if not (_DNS_NAME.fullmatch(domain) and _DNS_NAME.fullmatch(selector)):
            raise ConfigError("DKIM domain and selector must be ASCII DNS names")
        try:
            key = serialization.load_pem_private_key(private_key_pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError("DKIM private key is not an unencrypted PEM key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError("DKIM private key must be RSA (rsa-sha256, RFC 8301)")
        if key.key_size < MIN_KEY_BITS:
            raise ConfigError(f"DKIM key must have at least {MIN_KEY_BITS} bits (RFC 8301)")
        if (ed25519_selector is None) != (ed25519_private_key is None):
            raise ConfigError("set both the DKIM Ed25519 selector and its key, or neither")
        self.domain = domain.lower()
        self.selector = selector
        self._key = key
        self.ed25519_selector = ed25519_selector
        self._ed25519: ed25519.Ed25519PrivateKey | None = None
        if ed25519_selector is not None and ed25519_private_key is not None:
            if not _DNS_NAME.fullmatch(ed25519_selector) or ed25519_selector == selector:
                raise ConfigError(
                    "the DKIM Ed25519 selector must be an ASCII DNS name other than the RSA one"
                )
            self._ed25519 = _load_ed25519(ed25519_private_key)
        # Every field is listed twice ("oversigning", RFC 6376 section 8.15): a copy added
        # in transit, such as a second List-Unsubscribe, then breaks the signature.
        self._signed = list(SIGNED_HEADERS + SIGNED_HEADERS)
        self._signed_names = frozenset(SIGNED_HEADERS)
        self._h_line = _fold_list(b" h=", self._signed, b":", b"") + b";\r\n"
        self._remembered: dict[bytes, tuple[bytes, bytes]] = {}
        self._padding = padding.PKCS1v15()
        self._prehashed = Prehashed(hashes.SHA256())
        self._tags_at: tuple[int, bytes, bytes] = (-1, b"", b"")

    def dns_records(self) -> dict[str, str]:
        """The TXT records to publish: ``{"selector._domainkey.domain": "v=DKIM1; ..."}``."""
        public = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        records = {
            f"{self.selector}._domainkey.{self.domain}":
                f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}",
        }
        if self._ed25519 is not None:
            raw = self._ed25519.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            # RFC 8463 section 4.2: p= is the base64 of the raw 32-byte public key.
            records[f"{self.ed25519_selector}._domainkey.{self.domain}"] = (
                f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"
            )
        return records

    def _canonical(self, field: bytes) -> tuple[bytes, bytes] | None:
        """The canonical (name, value) of a signed field; None for a field ``h=`` omits."""
        remembered = self._remembered.get(field)
        if remembered is not None:
            return remembered
        name, _, value = field.partition(b":")
        lower = name.lower().rstrip()
        if lower not in self._signed_names:
            return None
        canonical = relaxed_header(name, value)
        if lower in _REPEATED_FIELDS:
            if len(self._remembered) >= _MAX_REMEMBERED:
                self._remembered.clear()
            self._remembered[field] = canonical
        return canonical

    def _tags(self, now: int) -> tuple[bytes, bytes]:
        """The folded tag lines before ``h=``, for RSA and Ed25519, at second ``now``."""
        at, rsa_tags, ed_tags = self._tags_at
        if at != now:
            common = [b"c=relaxed/relaxed", b"d=" + self.domain.encode(), b"t=%d" % now]
            rsa_tags = _fold_list(b"DKIM-Signature: ", [
                b"v=1", b"a=rsa-sha256", *common[:2], b"s=" + self.selector.encode(),
                common[2],
            ], b";", b" ") + b";\r\n"
            if self.ed25519_selector is not None:
                ed_tags = _fold_list(b"DKIM-Signature: ", [
                    b"v=1", b"a=ed25519-sha256", *common[:2],
                    b"s=" + self.ed25519_selector.encode(), common[2],
                ], b";", b" ") + b";\r\n"
            self._tags_at = (now, rsa_tags, ed_tags)
        return rsa_tags, ed_tags

    def signature_header(self, message: bytes) -> bytes:
        """Return the ``DKIM-Signature: ...\\r\\n`` header line(s) to prepend to ``message``."""
        split = message.find(b"\r\n\r\n")
        if split == -1:
            raise ValueError("message has no header/body separator")
        # relaxed/relaxed (RFC 6376 section 3.4.2, 3.4.4) survives the re-folding and
        # trailing-space changes relays make; "simple" breaks on any of them.
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(message[split + 4:])).digest())
        # RFC 6376 section 5.4.2: the n-th listing of a name takes the n-th instance from
        # the bottom; a listing with no instance left signs that field's absence.
        instances: dict[bytes, list[bytes]] = {}
        for field in _FIELD_END.split(message[:split]):
            canonical = self._canonical(field)
            if canonical is not None:
                instances.setdefault(canonical[0], []).append(canonical[1])
        signed: list[bytes] = []
        for name in self._signed:
            remaining = instances.get(name)
            if remaining:
                signed.append(name + b":" + remaining.pop())
        headers = b"".join(signed)
        rsa_tags, ed_tags = self._tags(int(time.time()))
        tail = self._h_line + b" bh=" + body_hash + b";\r\n b="
        rsa_value = rsa_tags + tail
        signature = self._key.sign(
            hashlib.sha256(headers + _signature_field(rsa_value)).digest(),
            self._padding, self._prehashed,
        )
        out = rsa_value + _wrap_signature(signature)
        if self._ed25519 is not None:
            # RFC 8463 section 3: Ed25519 (PureEdDSA) signs the SHA-256 hash of the same
            # header data that RSA signs.
            ed_value = ed_tags + tail
            digest = hashlib.sha256(headers + _signature_field(ed_value)).digest()
            out += ed_value + _wrap_signature(self._ed25519.sign(digest))
        return out

    @classmethod
    def from_settings(cls, settings: Settings) -> DkimSigner | None:
        """Build a signer from ``MAILER_DKIM_*``; ``None`` when DKIM is not configured.

        The Ed25519 pair (``MAILER_DKIM_ED25519_SELECTOR``, ``_PRIVATE_KEY_FILE``) adds a
        second signature to the RSA one.
        """
        values = (settings.dkim_domain, settings.dkim_selector, settings.dkim_private_key_file)
        ed_selector = settings.dkim_ed25519_selector
        ed_key_file = settings.dkim_ed25519_private_key_file
        if not any(values):
            if ed_selector or ed_key_file:
                raise ConfigError("MAILER_DKIM_ED25519_* adds to the RSA signature: set "
                                  "MAILER_DKIM_DOMAIN, _SELECTOR and _PRIVATE_KEY_FILE too")
            return None
        domain, selector, key_file = values
        if not (domain and selector and key_file):
            raise ConfigError(
                "set all of MAILER_DKIM_DOMAIN, MAILER_DKIM_SELECTOR and "
                "MAILER_DKIM_PRIVATE_KEY_FILE, or none of them"
            )
        if bool(ed_selector) != bool(ed_key_file):
            raise ConfigError("set both MAILER_DKIM_ED25519_SELECTOR and "
                              "MAILER_DKIM_ED25519_PRIVATE_KEY_FILE, or neither")
        pem = _read_key("MAILER_DKIM_PRIVATE_KEY_FILE", key_file)
        ed_key = _read_key("MAILER_DKIM_ED25519_PRIVATE_KEY_FILE", ed_key_file) if (
            ed_key_file) else None
        return cls(domain, selector, pem, ed25519_selector=ed_selector or None,
                   ed25519_private_key=ed_key)


def _signature_field(value: bytes) -> bytes:
    """The DKIM-Signature field as it is hashed: relaxed, empty b=, no final CRLF (3.7)."""
    name, _, rest = value.partition(b":")
    canonical_name, canonical_value = relaxed_header(name, rest)
    return canonical_name + b":" + canonical_value.rstrip(b"\r\n")


def _read_key(variable: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {variable}: {exc.strerror}") from None
