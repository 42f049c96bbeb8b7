"""Shared keys and a fixed clock for the webhook tests; every key is generated here."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

#: The tests' "now": five minutes after the fixtures' events.
NOW = datetime(2024, 1, 1, 0, 5, tzinfo=UTC)


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    """An RSA key standing in for AWS's SNS signing key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    """An RSA key that is not the one behind the provisioned certificate."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key standing in for SendGrid's signing key."""
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def other_ec_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 key SendGrid never used."""
    return ec.generate_private_key(ec.SECP256R1())
