"""Amazon SNS message signatures: certificate URL checks, certificates, string to sign."""

from __future__ import annotations

import base64
import binascii
import functools
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timedelta
from email.message import Message
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mailer.webhooks._support.errors import (
    CertificateUnavailable,
    ParseError,
    Replayed,
    VerificationFailed,
)
from mailer.webhooks._support.times import from_iso

if TYPE_CHECKING:
    from mailer.webhooks._support.config import WebhookConfig

# The host pattern of the AWS SDK message validators (.NET, PHP, JS), kept to the commercial
# partition: anything else could serve a certificate an attacker controls.
_CERT_HOST = re.compile(r"sns\.[a-zA-Z0-9-]{3,}\.amazonaws\.com")
_CERT_FILE = re.compile(r"[A-Za-z0-9._-]+\.pem")

#: Fields signed for each message type, in the byte order AWS sorts them.
SIGNED_FIELDS: dict[str, tuple[str, ...]] = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
    ),
    "UnsubscribeConfirmation": (
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
    ),
}
#: Fields that may be left out of the envelope and then of the string to sign.
OPTIONAL_FIELDS = frozenset({"Subject"})

#: Digest per ``SignatureVersion``: 1 is SHA1withRSA (the topic default), 2 SHA256withRSA.
SIGNATURE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}

#: How old a message may be. SNS retries an HTTP(S) delivery with the original Timestamp
#: for at most an hour (its delivery-policy ceiling), so a 5-minute window would drop
#: legitimate retries; replays inside the hour are absorbed by event-id idempotency.
MAX_AGE = timedelta(hours=1)
#: How far a Timestamp may lie in the future (clock skew between AWS and us).
MAX_SKEW = timedelta(minutes=5)

#: Seconds to wait for AWS when a certificate is not pre-provisioned (each socket step).
FETCH_TIMEOUT = 5.0
#: Seconds a whole download may take: the per-step timeout alone lets a server that drips
#: a byte every few seconds hold the request (and its worker thread) for hours.
FETCH_DEADLINE = 10.0
#: Largest certificate accepted from the network; SNS certificates are about 2 KB.
MAX_CERT_BYTES = 64 * 1024


def cert_file_name(url: str) -> str:
    """Return the file name of an acceptable ``SigningCertURL``; raise VerificationFailed.

    Accepted: ``https://sns.<region>.amazonaws.com/<name>.pem`` with no user, port, query
    or fragment. The check is pure string work, so a bad URL never opens a connection.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        raise VerificationFailed("SigningCertURL is not a URL") from None
    if parts.scheme != "https":
        raise VerificationFailed("SigningCertURL is not https")
    if not _CERT_HOST.fullmatch(parts.netloc):
        raise VerificationFailed("SigningCertURL is not on an SNS host")
    if parts.query or parts.fragment or "#" in url:
        raise VerificationFailed("SigningCertURL has a query or fragment")
    name = parts.path.rsplit("/", 1)[-1]
    if not parts.path.startswith("/") or not _CERT_FILE.fullmatch(name) or name.startswith("."):
        raise VerificationFailed("SigningCertURL does not name a .pem file")
    return name


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could leave the checked SNS host; certificates are served directly.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        raise urllib.error.HTTPError(req.full_url, code, "redirect refused", headers, fp)


@functools.lru_cache(maxsize=32)
def fetch_certificate(url: str) -> bytes:
    """Download a signing certificate from a checked SNS URL; cached for the process.

    Blocking: the web layer calls it from a worker thread, never on the event loop.
    """
    cert_file_name(url)  # defence in depth: never fetch an unchecked URL
    opener = urllib.request.build_opener(_NoRedirect)
    deadline = time.monotonic() + FETCH_DEADLINE
    data = bytearray()
    try:
        # The URL was checked to be https on an SNS host just above.
        with opener.open(url, timeout=FETCH_TIMEOUT) as response:
            while len(data) <= MAX_CERT_BYTES:
                if time.monotonic() > deadline:
                    raise CertificateUnavailable("SNS signing certificate download too slow")
                chunk = response.read1(16 * 1024)
                if not chunk:
                    break
                data += chunk
    except (OSError, ValueError) as exc:
        raise CertificateUnavailable("SNS signing certificate could not be fetched") from exc
    if len(data) > MAX_CERT_BYTES:
        raise CertificateUnavailable("SNS signing certificate is implausibly large")
    return bytes(data)


def load_public_key(url: str, config: WebhookConfig) -> rsa.RSAPublicKey:
    """Return the RSA key of the certificate at ``url``, pre-provisioned file first."""
    name = cert_file_name(url)
    data: bytes | None = None
    if config.sns_cert_dir is not None:
        path = config.sns_cert_dir / name
        if path.is_file():
            data = path.read_bytes()
    if data is None:
        data = config.fetch_cert(url)
    try:
        key = x509.load_pem_x509_certificate(data).public_key()
    except ValueError:
        raise VerificationFailed("SNS signing certificate is not a PEM certificate") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise VerificationFailed("SNS signing certificate does not hold an RSA key")
    return key


def string_to_sign(envelope: Mapping[str, Any]) -> bytes:
    """Build the canonical ``Key\\nValue\\n`` text SNS signs for this message type."""
    fields = SIGNED_FIELDS.get(str(envelope.get("Type")))
    if fields is None:
        raise VerificationFailed("unknown SNS message type")
    lines: list[str] = []
    for name in fields:
        value = envelope.get(name)
        if value is None and name in OPTIONAL_FIELDS:
            continue
        if not isinstance(value, str):
            raise VerificationFailed(f"SNS field {name} is missing")
        lines.append(f"{name}\n{value}\n")
    return "".join(lines).encode("utf-8")


def verify_envelope(envelope: Mapping[str, Any], config: WebhookConfig, now: datetime) -> None:
    """Verify an SNS envelope's topic, certificate URL, signature and age."""
    topic = envelope.get("TopicArn")
    # Checked before anything else so an unexpected topic never causes a certificate fetch.
    if not isinstance(topic, str) or topic not in config.ses_topic_arns:
        raise VerificationFailed("TopicArn is not an expected topic")
    algorithm = SIGNATURE_HASHES.get(str(envelope.get("SignatureVersion")))
    if algorithm is None:
        raise VerificationFailed("unsupported SNS SignatureVersion")
    url = envelope.get("SigningCertURL")
    if not isinstance(url, str):
        raise VerificationFailed("SigningCertURL is missing")
    cert_file_name(url)
    signature_text = envelope.get("Signature")
    if not isinstance(signature_text, str):
        raise VerificationFailed("Signature is missing")
    try:
        signature = base64.b64decode(signature_text, validate=True)
    except (binascii.Error, ValueError):
        raise VerificationFailed("Signature is not base64") from None
    signed = string_to_sign(envelope)
    key = load_public_key(url, config)
    try:
        key.verify(signature, signed, padding.PKCS1v15(), algorithm())
    except InvalidSignature:
        raise VerificationFailed("SNS signature does not match") from None
    try:
        sent_at = from_iso(envelope.get("Timestamp"))
    except ParseError:
        raise Replayed("SNS Timestamp is unreadable") from None
    if sent_at > now + MAX_SKEW or sent_at < now - MAX_AGE - MAX_SKEW:
        raise Replayed("SNS Timestamp is outside the accepted window")
