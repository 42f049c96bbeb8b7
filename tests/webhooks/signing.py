"""Test-side signers: each produces what the real provider would send, with keys made here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from mailer.webhooks._support.sns import string_to_sign

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_bytes(name: str) -> bytes:
    """Return a fixture file's bytes exactly as stored."""
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    """Return a JSON fixture decoded."""
    return json.loads(fixture_bytes(name))


def flip_bit(body: bytes, index: int, bit: int = 0) -> bytes:
    """Return ``body`` with one bit flipped at ``index`` (negative counts from the end)."""
    data = bytearray(body)
    data[index] ^= 1 << bit
    return bytes(data)


def self_signed_cert(key: rsa.RSAPrivateKey) -> bytes:
    """Return a PEM self-signed certificate for ``key``, standing in for AWS's SNS cert."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    start = datetime(2023, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def sign_sns(envelope: dict[str, Any], key: rsa.RSAPrivateKey) -> bytes:
    """Sign an SNS envelope per its SignatureVersion and return the body SNS would POST."""
    algorithm = hashes.SHA1() if envelope["SignatureVersion"] == "1" else hashes.SHA256()
    signature = key.sign(string_to_sign(envelope), padding.PKCS1v15(), algorithm)
    signed = dict(envelope, Signature=base64.b64encode(signature).decode())
    return json.dumps(signed, indent=2).encode()


def sendgrid_headers(
    key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes
) -> dict[str, str]:
    """Return the two headers SendGrid sends for ``body`` signed at ``timestamp``."""
    signature = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def sendgrid_key_text(key: ec.EllipticCurvePrivateKey) -> str:
    """Return the public key as SendGrid's console shows it: base64 DER, no armour."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def mailgun_body(
    fixture: str, signing_key: str, timestamp: str, token: str, **json_options: Any
) -> bytes:
    """Return a Mailgun fixture with a signature block computed as Mailgun does."""
    payload = fixture_json(fixture)
    digest = hmac.new(signing_key.encode(), (timestamp + token).encode(), hashlib.sha256)
    payload["signature"] = {
        "timestamp": timestamp,
        "token": token,
        "signature": digest.hexdigest(),
    }
    return json.dumps(payload, **json_options).encode()


def basic_auth(user: str, password: str) -> dict[str, str]:
    """Return an Authorization header carrying HTTP basic credentials (RFC 7617)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
