"""DkimSigner: its own relaxed canonicalisation matches dkimpy's, and dual RSA + Ed25519
signatures (RFC 8463) both verify with dkimpy."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.config import Settings
from mailer.errors import ConfigError
from mailer.mail.dkim import DkimSigner, relaxed_body, relaxed_header
from mailer.mail.mime import MessageBuilder
from tests.mail.test_mime import build

# Bytes rich in what canonicalisation rewrites: spaces, tabs, CR, LF, CRLF, blank lines.
_PIECES = st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r", b"\n", b"\r\n\r\n",
                           b"a", b"word", b".", b"\x0b", b"\xc3\xa9"])
_BYTES = st.lists(_PIECES | st.binary(max_size=4), max_size=30).map(b"".join)


@pytest.fixture(scope="module")
def rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def ed_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def dual_signer(rsa_pem: bytes, ed_key: ed25519.Ed25519PrivateKey) -> DkimSigner:
    return DkimSigner("example.com", "rsa1", rsa_pem, ed25519_selector="ed1",
                      ed25519_private_key=ed_pem(ed_key))


def verify_all(data: bytes, signer: DkimSigner) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature, top first, against the signer's records."""
    records = {f"{name}.".encode(): txt.encode() for name, txt in signer.dns_records().items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name, b"")

    def one(index: int) -> bool:
        try:
            return bool(dkim.DKIM(data).verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException:  # a body hash mismatch is raised, not returned
            return False

    return [one(i) for i in range(data.split(b"\r\n\r\n", 1)[0].count(b"DKIM-Signature:"))]


# --- canonicalisation ------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(_BYTES)
def test_relaxed_body_matches_dkimpy(body: bytes) -> None:
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=400, deadline=None)
@given(_BYTES, _BYTES)
def test_relaxed_header_matches_dkimpy(name: bytes, value: bytes) -> None:
    [expected] = Relaxed.canonicalize_headers([(name, value)])
    assert relaxed_header(name, value) == expected


def test_a_repeated_message_shape_signs_the_same_as_a_fresh_signer(rsa_pem: bytes) -> None:
    # Given a signer that has already signed messages (and remembers their fixed fields)
    warm = DkimSigner("example.com", "s1", rsa_pem)
    builder = MessageBuilder("Example Shop <shop@example.com>", "help@example.com", warm)
    for n in range(3):
        build(builder, to_email=f"r{n}@example.org")
    # When it signs a new message, and a fresh signer signs the same bytes in the same second
    unsigned = build(MessageBuilder("Example Shop <shop@example.com>", "help@example.com"))
    fresh = DkimSigner("example.com", "s1", rsa_pem)
    first, second = warm.signature_header(unsigned.data), fresh.signature_header(unsigned.data)
    # Then both headers are identical (RSA PKCS#1 v1.5 is deterministic), unless the clock
    # ticked between the two calls
    if first.split(b" t=")[1][:10] == second.split(b" t=")[1][:10]:
        assert first == second


# --- RSA + Ed25519 (RFC 8463) ----------------------------------------------------------

def test_dual_signatures_both_verify_with_dkimpy(
    rsa_pem: bytes, ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    # Given a signer with an RSA key and an additional Ed25519 key under its own selector
    signer = dual_signer(rsa_pem, ed_key)
    data = build(MessageBuilder("Example Shop <shop@example.com>", None, signer),
                 subject="Grüße 🎉", html="<p>Hallo  Jürgen\t!</p>", text=None).data
    # Then the message carries two signatures, RSA first, and dkimpy verifies both
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert b"DKIM-Signature: v=1; a=ed25519-sha256;" in head
    assert b" s=ed1;" in head and b" s=rsa1;" in head
    assert verify_all(data, signer) == [True, True]
    # And the published Ed25519 record is the raw 32-byte key (RFC 8463 section 4.2)
    record = signer.dns_records()["ed1._domainkey.example.com"]
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(record.split("p=")[1])) == 32


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"List-Unsubscribe=One-Click", b"List-Unsubscribe=Other"),
        (b"Hello Jane", b"Hello Joan"),
        (b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\nList-Unsubscribe: <https://e.x/u>\r\n"),
    ],
)
def test_tampering_breaks_both_signatures(
    rsa_pem: bytes, ed_key: ed25519.Ed25519PrivateKey, old: bytes, new: bytes,
) -> None:
    signer = dual_signer(rsa_pem, ed_key)
    data = build(MessageBuilder("shop@example.com", None, signer)).data
    tampered = data.replace(old, new, 1)
    assert tampered != data
    assert verify_all(tampered, signer) == [False, False]


def test_an_ed25519_key_in_dkimpys_base64_form_is_accepted(
    rsa_pem: bytes, ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    # Given the key as dkimpy's dknewkey writes it: the 32 private bytes in base64
    raw = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
    signer = DkimSigner("example.com", "rsa1", rsa_pem, ed25519_selector="ed1",
                        ed25519_private_key=base64.b64encode(raw) + b"\n")
    # Then it signs as the PEM form does
    data = build(MessageBuilder("shop@example.com", None, signer)).data
    assert verify_all(data, signer) == [True, True]


@pytest.mark.parametrize(
    ("selector", "key", "message"),
    [
        ("ed1", b"not a key", "neither an unencrypted PEM key nor 32 bytes"),
        ("ed1", "rsa", "must be an Ed25519 key"),
        ("rsa1", "ed", "other than the RSA one"),
        ("ed 1", "ed", "ASCII DNS name"),
        (None, "ed", "both"),
    ],
)
def test_bad_ed25519_configuration_is_a_config_error(
    rsa_pem: bytes, ed_key: ed25519.Ed25519PrivateKey, selector: str | None, key: Any,
    message: str,
) -> None:
    if key == "rsa":
        key = rsa_pem
    elif key == "ed":
        key = ed_pem(ed_key)
    with pytest.raises(ConfigError, match=message):
        DkimSigner("example.com", "rsa1", rsa_pem, ed25519_selector=selector,
                   ed25519_private_key=key)


def _settings(**values: str) -> Settings:
    """Settings read from MAILER_* variables, as a process would read them (SPEC 10)."""
    env = {"MAILER_ENV": "test", "MAILER_DKIM_DOMAIN": "example.com",
           "MAILER_DKIM_SELECTOR": "rsa1"}
    env.update({f"MAILER_{name.upper()}": value for name, value in values.items()})
    return Settings.from_environ({k: v for k, v in env.items() if v})


def test_from_settings_reads_the_ed25519_pair(
    tmp_path: Path, rsa_pem: bytes, ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    rsa_file, ed_file = tmp_path / "rsa.pem", tmp_path / "ed.pem"
    rsa_file.write_bytes(rsa_pem)
    ed_file.write_bytes(ed_pem(ed_key))
    # Given the RSA settings and both Ed25519 settings, then a dual signer
    signer = DkimSigner.from_settings(_settings(
        dkim_private_key_file=str(rsa_file), dkim_ed25519_selector="ed1",
        dkim_ed25519_private_key_file=str(ed_file)))
    assert signer is not None and signer.ed25519_selector == "ed1"
    assert verify_all(build(MessageBuilder("shop@example.com", None, signer)).data,
                      signer) == [True, True]
    # Given only half of the Ed25519 pair, then a configuration error
    with pytest.raises(ConfigError, match="ED25519_SELECTOR and"):
        DkimSigner.from_settings(_settings(dkim_private_key_file=str(rsa_file),
                                           dkim_ed25519_selector="ed1"))
    # Given Ed25519 without the RSA signature it adds to, then a configuration error
    with pytest.raises(ConfigError, match="adds to the RSA signature"):
        DkimSigner.from_settings(_settings(dkim_domain="", dkim_selector="",
                                           dkim_ed25519_selector="ed1",
                                           dkim_ed25519_private_key_file=str(ed_file)))
    # Given an unreadable Ed25519 key file, then a configuration error naming the variable
    with pytest.raises(ConfigError, match="MAILER_DKIM_ED25519_PRIVATE_KEY_FILE"):
        DkimSigner.from_settings(_settings(
            dkim_private_key_file=str(rsa_file), dkim_ed25519_selector="ed1",
            dkim_ed25519_private_key_file=str(tmp_path / "missing.pem")))


def test_pipelining_can_be_turned_off_for_a_relay_that_mishandles_it() -> None:
    # Given no setting / Then pipelining is on; Given MAILER_SMTP_PIPELINING=false / off
    assert Settings.from_environ({"MAILER_ENV": "test"}).smtp_pipelining is True
    off = Settings.from_environ({"MAILER_ENV": "test", "MAILER_SMTP_PIPELINING": "false"})
    assert off.smtp_pipelining is False
    # And a value that is not a boolean stops the process with the variable's name
    with pytest.raises(ConfigError, match="MAILER_SMTP_PIPELINING"):
        Settings.from_environ({"MAILER_ENV": "test", "MAILER_SMTP_PIPELINING": "maybe"})
