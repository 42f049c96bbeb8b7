"""Address normalisation (email-validator, ASCII envelopes) and the keyed lookup hash."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from suppression.addresses import InvalidAddressError, address_hash, normalise

KEY = b"test-secret-key"


@pytest.mark.parametrize(
    ("typed", "normalised"),
    [
        # The domain is lower-cased; the local part keeps its case (RFC 5321 2.4).
        ("User.Name@Example.COM", "User.Name@example.com"),
        ("a+tag@EX.com", "a+tag@ex.com"),
        # An IDN domain is sent in its A-label (punycode) form, however it was typed.
        ("user@bücher.de", "user@xn--bcher-kva.de"),
        ("user@BÜCHER.de", "user@xn--bcher-kva.de"),
        ("user@xn--BCHER-kva.DE", "user@xn--bcher-kva.de"),
        # Full-width letters in the domain fold to ASCII (IDNA mapping).
        ("a@\uff45xample.com", "a@example.com"),
    ],
)
def test_normalise(typed: str, normalised: str) -> None:
    assert normalise(typed) == normalised


def test_normalise_is_idempotent() -> None:
    once = normalise("Jane.Doe@Bücher.DE")
    assert normalise(once) == once


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "no-at-sign.example.com",
        "a@@example.com",
        "@example.com",
        "a@",
        " a@example.com",
        "a@example.com ",
        "a b@example.com",
        "a@exa mple.com",
        "a@example.com\n",
        "a@example.com\x00",
        # SMTP command injection through the envelope.
        "a@b.com>\r\nRCPT TO:<c@d.com>",
        "a@example.com\r\nBcc: victim@example.org",
        # Quoted strings hide '@', spaces and CRLF from naive parsers.
        '"a@b.com"@example.com',
        '"a b"@example.com',
        '"a\r\nRCPT TO:<c@d.com>"@example.com',
        # Display names, lists, domain literals and other things that are not one mailbox.
        "Name <a@example.com>",
        "a@example.com,c@example.org",
        "a@[192.0.2.1]",
        "a.@example.com",
        "a..b@example.com",
        "a@example.com.",
        "a@localhost",
        "a@b.c\u200bom",
        # RFC 5321 4.5.3.1.1: at most 64 octets of local part.
        "a" * 65 + "@example.com",
        "a@" + "b" * 64 + ".com",
    ],
)
def test_invalid_addresses_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidAddressError):
        normalise(bad)


@pytest.mark.parametrize("bad", ["ñandú@example.com", "aé@example.com", "用户@例子.广告"])
def test_internationalised_local_parts_are_rejected_clearly(bad: str) -> None:
    # We send ASCII envelopes only: SMTPUTF8 local parts have no ASCII form.
    with pytest.raises(InvalidAddressError, match="internationalised"):
        normalise(bad)


def test_error_messages_never_echo_the_address() -> None:
    # Given an address with a recognisable local part and domain
    bad = "secretperson<>@private-domain.example"
    with pytest.raises(InvalidAddressError) as caught:
        normalise(bad)
    # Then neither part reaches the message (it may end up in logs or error bodies).
    message = str(caught.value)
    assert "secretperson" not in message
    assert "private-domain" not in message
    assert caught.value.__cause__ is None


@pytest.mark.parametrize("bad", [
    # RFC 2047 section 5: no encoded-word anywhere in an addr-spec.
    "=?utf-8?q?evil?=@example.com",
    "=?utf-8?b?ZXZpbA==?=@example.com",
    "a=?x?q?y?=b@example.com",
    "=?utf-8?q?a=0D=0ABcc:_x?=@example.com",
])
def test_encoded_words_are_not_addresses(bad: str) -> None:
    with pytest.raises(InvalidAddressError, match="encoded-word"):
        normalise(bad)


@pytest.mark.parametrize("bad", [
    # RFC 5321 4.5.3.1.3: the whole path is at most 254 octets without its brackets.
    "a" * 64 + "@" + ".".join(["b" * 63] * 3) + ".com",
    "x" * 300 + "@example.com",
    "a@" + "b" * 1_000_000,
    # The ASCII form counts: this U-label domain is short, its punycode is not.
    "a" * 64 + "@" + ".".join(["a\u00e4b\u03c9c\u0436d\u00fce\u00f6f\u044fg\u03bbh\u0449"] * 6)
    + ".de",
])
def test_over_long_addresses_are_refused_without_echo(bad: str) -> None:
    with pytest.raises(InvalidAddressError) as caught:
        normalise(bad)
    assert bad[:20] not in str(caught.value)


def test_the_longest_valid_address_is_accepted() -> None:
    # Given a 64-octet local part and a domain that brings the address to 254 octets
    domain = ".".join(["b" * 63, "c" * 63, "d" * 57]) + ".com"
    address = "a" * 64 + "@" + domain
    assert len(address) == 254
    # Then it is valid, and one more octet is not
    assert normalise(address) == address
    with pytest.raises(InvalidAddressError):
        normalise("a" + address)


def test_non_string_is_rejected() -> None:
    with pytest.raises(InvalidAddressError):
        normalise(b"a@example.com")  # type: ignore[arg-type]


def test_special_use_test_domain_only_in_test_environment() -> None:
    with pytest.raises(InvalidAddressError):
        normalise("dev@shop.test")
    assert normalise("dev@Shop.TEST", test_environment=True) == "dev@shop.test"


def test_invalid_address_error_is_a_value_error() -> None:
    assert issubclass(InvalidAddressError, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.emails())
def test_normalise_only_returns_safe_ascii_or_raises(text: str) -> None:
    # Given any text, When normalising, Then the result is one ASCII mailbox with no
    # whitespace or control characters, stable under a second pass; or InvalidAddressError.
    try:
        result = normalise(text)
    except InvalidAddressError:
        return
    assert result.isascii()
    assert result.count("@") == 1
    assert all(33 <= ord(ch) < 127 for ch in result)
    assert normalise(result) == result


def test_hash_is_stable_hex_sha256() -> None:
    digest = address_hash("a@example.com", KEY)
    assert digest == address_hash("a@example.com", KEY)
    assert len(digest) == 64
    int(digest, 16)


def test_hash_ignores_case_of_the_whole_address() -> None:
    # Given the same person typing the address in different cases
    assert address_hash(normalise("Foo@Example.com"), KEY) == address_hash(
        normalise("foo@example.com"), KEY
    )


def test_hash_depends_on_key_and_address() -> None:
    assert address_hash("a@example.com", KEY) != address_hash("a@example.com", b"other-key")
    assert address_hash("a@example.com", KEY) != address_hash("b@example.com", KEY)


def test_hash_is_keyed_hmac_not_bare_sha256() -> None:
    # A bare hash of a known address is recomputable by anyone; ours needs the secret.
    import hashlib
    import hmac

    expected = hmac.new(KEY, b"a@example.com", hashlib.sha256).hexdigest()
    assert address_hash("A@Example.com", KEY) == expected
    assert expected != hashlib.sha256(b"a@example.com").hexdigest()


def test_hash_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError):
        address_hash("a@example.com", b"")


# --- the remembered-domain shortcut gives email-validator's own verdict ---------------

_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_LOCALS = st.lists(st.text(alphabet=_ATEXT, min_size=1, max_size=22), min_size=1,
                   max_size=4).map(".".join)
_LABELS = st.sampled_from(["example", "EXAMPLE", "b\u00fccher", "xn--bcher-kva", "x", "123",
                           "a-b", "-ab", "ab-", "a_b", "xn--zz", "localhost", "test",
                           "invalid", "local", "com", "org", "de", "\uff45x", "a" * 63,
                           "a" * 64, "", "ex ample", "example."])
_DOMAINS = st.lists(_LABELS, min_size=1, max_size=5).map(".".join)


def _without_shortcut(address: str, test_environment: bool) -> str | Exception:
    """normalise() with no domain remembered: every address goes to email-validator."""
    from suppression import addresses

    with mock.patch.object(addresses, "_domain", lambda domain, test_env: None):
        try:
            return normalise(address, test_environment=test_environment)
        except InvalidAddressError as exc:
            return exc


@settings(max_examples=400)
@given(_LOCALS, _DOMAINS, st.booleans())
def test_shortcut_equals_the_full_validation(local: str, domain: str, test_env: bool) -> None:
    address = f"{local}@{domain}"
    try:
        ours: str | Exception = normalise(address, test_environment=test_env)
    except InvalidAddressError as exc:
        ours = exc
    reference = _without_shortcut(address, test_env)
    if isinstance(reference, Exception):
        assert isinstance(ours, InvalidAddressError)
    else:
        assert ours == reference


def test_a_long_local_part_at_a_known_domain_is_still_refused() -> None:
    normalise("someone@example.com")  # the domain is now remembered
    with pytest.raises(InvalidAddressError):
        normalise("x" * 65 + "@example.com")
    with pytest.raises(InvalidAddressError):
        normalise("a..b@example.com")
    with pytest.raises(InvalidAddressError):
        normalise(".a@example.com")
