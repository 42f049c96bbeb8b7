"""Header validation, RFC 2047 encoding, address formatting and folding (mailer.mail.headers)."""

from __future__ import annotations

import base64
import email.policy
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.errors import ConfigError, HeaderInjection, InvalidAddress
from mailer.mail.headers import (
    check_header_value,
    encode_header_text,
    fold,
    format_address,
    parse_sender,
)


def b_word(raw: bytes) -> str:
    """An RFC 2047 B encoded-word for ``raw``."""
    return "=?utf-8?b?" + base64.b64encode(raw).decode() + "?="


#: Header injection (SPEC 6: a control character, raw or RFC 2047-encoded, is a 422), plus
#: the variants parsers disagree on.
INJECTIONS = {
    "cr": "Hi\rBcc: victim@example.net",
    "lf": "Hi\nBcc: victim@example.net",
    "crlf": "Hi\r\nBcc: victim@example.net",
    "crlf-crlf-body": "Hi\r\n\r\nInjected body",
    "nul": "Hi\x00there",
    "del": "Hi\x7fthere",
    "tab": "Hi\tthere",
    "trailing-lf": "Hello\n",
    "nel": "Hi\x85Bcc: victim@example.net",
    "line-separator": "Hi\u2028Bcc: victim@example.net",
    "paragraph-separator": "Hi\u2029Bcc: victim@example.net",
    "q-newline-probe": "Hi=?UTF-8?Q?=0A?=Reply-To: evil@example.net",
    "q-newline-lower": "=?utf-8?q?=0d=0aBcc:_victim@example.net?=",
    "b-newline": "Hi " + b_word(b"\nBcc: victim@example.net"),
    "b-newline-upper": "=?UTF-8?B?" + base64.b64encode(b"\r\n").decode() + "?=",
    "b-unpadded": "=?utf-8?b?" + base64.b64encode(b"a\n").decode().rstrip("=") + "?=",
    "q-nul": "=?utf-8?q?a=00b?=",
    "q-del": "=?utf-8?q?a=7Fb?=",
    "q-u2028": "=?utf-8?q?a=E2=80=A8b?=",
    "latin1-nel": "=?iso-8859-1?q?a=85b?=",
    "rfc2231-language": "=?UTF-8*en?Q?=0A?=",
    "utf7-newline": "=?utf-7?q?+AAo-?=",
    "unknown-charset": "=?x-no-such-charset?q?harmless?=",
    "not-a-text-codec": "=?rot13?q?uryyb?=",
    "whitespace-inside-word": "=?utf-8?q?a =0A?=",
    "hidden-behind-bogus-word": "=?utf-8?q?abc =?utf-8?q?=0A?=",
    "undecodable-utf8": "=?utf-8?b?" + base64.b64encode(b"\xff\xfe").decode() + "?=",
    "long-unfoldable-comment": "(" + "x" * 1000 + ")",
    "long-utf8": "\u00e9" * 500,
}


# --- check_header_value ---------------------------------------------------------------

@pytest.mark.parametrize("field", ["subject", "to_name", "List-Id"])
@pytest.mark.parametrize("payload", INJECTIONS.values(), ids=INJECTIONS.keys())
def test_every_injection_payload_is_refused_in_every_field(field: str, payload: str) -> None:
    # Given a payload that could start a new header line once decoded
    # When it is checked for a field
    with pytest.raises(HeaderInjection) as caught:
        check_header_value(field, payload)
    # Then the error names the field (the API answers 422) and does not echo the value
    error = caught.value
    assert str(error).startswith(f"{field}: ")
    assert error.status == 422
    assert error.code == "invalid_header"
    assert payload not in str(error)
    assert "victim" not in str(error) and "x" * 50 not in str(error)


@pytest.mark.parametrize(
    "value",
    [
        "Your order #123 has shipped",
        "Grüße aus Köln",
        "会议纪要第三季度报告",
        "Party 🎉🥳 tonight",
        "Price =? maybe",  # "=?" that is no encoded-word
        "=?utf-8?q?hello_world?=",  # a harmless encoded-word (sent literally, see below)
        "quotes \" and back\\slash",
        "",
        "a" * 998,
        "\u00e9" * 499,  # 998 octets in UTF-8
    ],
)
def test_benign_values_come_back_unchanged(value: str) -> None:
    # Given ordinary subjects, including non-ASCII and the 998-octet limit itself
    # Then they pass unchanged
    assert check_header_value("subject", value) is value


def test_the_length_limit_counts_utf8_octets() -> None:
    # Given 333 three-octet characters (999 octets) in 333 characters
    # Then the value is refused although it is short in characters
    with pytest.raises(HeaderInjection, match="998 octets"):
        check_header_value("subject", "€" * 333)


def test_lone_surrogates_are_refused() -> None:
    # Given a lone surrogate, which JSON can carry but UTF-8 cannot encode
    with pytest.raises(HeaderInjection):
        check_header_value("subject", "Hi \ud800")


# --- encode_header_text ---------------------------------------------------------------

def parse_subject(header_bytes: bytes) -> str:
    """Parse one folded header line the way a Python receiver would."""
    msg = email.message_from_bytes(header_bytes + b"\r\nbody\r\n", policy=email.policy.default)
    return str(msg["subject"])


def test_plain_ascii_text_is_left_alone() -> None:
    assert encode_header_text("Your receipt from Example") == "Your receipt from Example"


@pytest.mark.parametrize(
    "value",
    [
        "Grüße 🎉",
        "会议" * 150,  # 300 CJK characters, 900 octets
        "🎉" * 200,  # four-octet characters
        "e\u0301" * 100,  # combining marks
        "=?utf-8?q?hello?=",  # literal text that looks like an encoded-word
        "  leading spaces kept",
        "x" * 500,  # one word too long for any line
    ],
)
def test_encoded_words_are_short_whole_characters_and_decode_back(value: str) -> None:
    # Given text that cannot be written as plain ASCII
    encoded = encode_header_text(value, offset=len("Subject: "))
    # Then every encoded-word is at most 75 characters (RFC 2047 section 2)
    words = encoded.split("\r\n ")
    assert all(len(word) <= 75 for word in words)
    assert all(re.fullmatch(r"=\?utf-8\?b\?[A-Za-z0-9+/=]+\?=", word) for word in words)
    # And each word decodes on its own, so no UTF-8 character was cut in two
    for word in words:
        base64.b64decode(word[10:-2]).decode("utf-8")
    # And the first line, after "Subject: ", stays within 78 characters
    assert len("Subject: " + words[0]) <= 78
    # And the stdlib parser gives back exactly the original text
    assert parse_subject(fold("Subject", encoded)) == value


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=200))
def test_any_accepted_text_round_trips_through_the_stdlib_parser(value: str) -> None:
    # Given any text the validator accepts
    try:
        check_header_value("subject", value)
    except HeaderInjection:
        return
    # When it is encoded and folded as a Subject
    line = fold("Subject", encode_header_text(value, offset=len("Subject: ")))
    # Then it is one header field of short lines that parses back to the same text
    lines = line.split(b"\r\n")[:-1]
    assert all(len(part) <= 78 for part in lines)
    assert all(part[:1] in (b" ",) for part in lines[1:])
    assert parse_subject(line) == value


# --- format_address -------------------------------------------------------------------

def parse_to(value: str) -> tuple[str, str]:
    """Parse a formatted mailbox back into (display name, addr-spec) with the stdlib."""
    msg = email.message_from_bytes(fold("To", value) + b"\r\nbody\r\n",
                                   policy=email.policy.default)
    (address,) = msg["to"].addresses
    return address.display_name, address.addr_spec


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, "jane@example.com"),
        ("", "jane@example.com"),
        ("Jane Doe", "Jane Doe <jane@example.com>"),
        ("Doe, Jane", '"Doe, Jane" <jane@example.com>'),
        ('Jane "JD" Doe', '"Jane \\"JD\\" Doe" <jane@example.com>'),
        ("back\\slash", '"back\\\\slash" <jane@example.com>'),
        ("J. Doe", '"J. Doe" <jane@example.com>'),
    ],
)
def test_display_names_are_quoted_only_when_needed(name: str | None, expected: str) -> None:
    assert format_address("jane@example.com", name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "Jane Doe",
        "Doe, Jane",
        'Jane "JD" Doe',
        'evil@example.net" <evil@example.net>',  # gh-80222-style spoof attempt
        "back\\slash \\\" mix",
        "Jürgen Müller",
        "Müller, Jürgen \"JJ\" <x>",
        "=?utf-8?q?not_an_encoded_word?=",
        "Jane  Doe ",
        "(comment) <angle> [brackets]; colon:",
        "李小龍",
        "A very long display name that certainly needs to be folded somewhere sensible",
    ],
)
def test_display_names_round_trip_through_the_stdlib_parser(name: str) -> None:
    # Given a display name with specials, quotes, backslashes or non-ASCII text
    formatted = format_address("jane@xn--bcher-kva.de", name)
    # Then the parsed mailbox has exactly that name and the original address
    assert parse_to(formatted) == (name, "jane@xn--bcher-kva.de")


@pytest.mark.parametrize(
    "address",
    [
        "b@example.com>\r\nRCPT TO:<c@example.com",
        "a@example.com\nBcc: c@example.com",
        "a@example.com, c@example.com",
        "<a@example.com>",
        "Name <a@example.com>",
        "user@bücher.de",  # must arrive in A-label form
        '"quoted local"@example.com',
        "no-at-sign",
    ],
)
def test_addresses_not_in_normalised_ascii_form_are_refused(address: str) -> None:
    with pytest.raises(InvalidAddress):
        format_address(address, "Jane")


@pytest.mark.parametrize("payload", INJECTIONS.values(), ids=INJECTIONS.keys())
def test_display_name_injection_is_refused(payload: str) -> None:
    with pytest.raises(HeaderInjection, match=r"^display name: "):
        format_address("jane@example.com", payload)


# --- parse_sender ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Mailer <no-reply@example.com>", ("Mailer", "no-reply@example.com")),
        ("no-reply@example.com", (None, "no-reply@example.com")),
        ("<no-reply@example.com>", (None, "no-reply@example.com")),
        ('"Shop, Inc." <shop@example.com>', ("Shop, Inc.", "shop@example.com")),
        ('"Say \\"hi\\"" <hi@example.com>', ('Say "hi"', "hi@example.com")),
        ("  Bücher Shop   <shop@xn--bcher-kva.de> ", ("Bücher Shop", "shop@xn--bcher-kva.de")),
    ],
)
def test_configured_senders_are_parsed(value: str, expected: tuple[str | None, str]) -> None:
    assert parse_sender(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Mailer",
        "Mailer <no-reply@bücher.de>",
        "Mailer <a@example.com> <b@example.com>",
        "Mailer <a@example.com>\r\nBcc: c@example.com",
        "Mail\ner <a@example.com>",
        "=?utf-8?q?Mail=0Aer?= <a@example.com>",
    ],
)
def test_bad_configured_senders_are_config_errors(value: str) -> None:
    # Given MAILER_FROM / MAILER_REPLY_TO values that are malformed or carry injections
    with pytest.raises(ConfigError):
        parse_sender(value)


# --- fold -----------------------------------------------------------------------------

def test_short_values_stay_on_one_line() -> None:
    assert fold("Subject", "Hello") == b"Subject: Hello\r\n"


def test_long_values_fold_at_spaces_and_unfold_to_the_same_text() -> None:
    # Given a long List-Unsubscribe value with two URIs
    value = "<https://example.com/u/" + "t" * 30 + ">, <mailto:unsub" + "s" * 40 + "@example.com>"
    folded = fold("List-Unsubscribe", value)
    # Then every line is at most 78 characters and continuation lines start with a space
    lines = folded.split(b"\r\n")
    assert lines[-1] == b""
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:-1])
    # And unfolding (removing CRLF before white space) restores the exact value
    assert folded.replace(b"\r\n ", b" ") == f"List-Unsubscribe: {value}\r\n".encode()


def test_multiple_spaces_survive_folding() -> None:
    value = "word   " * 20 + "end"
    folded = fold("Subject", value)
    assert folded.replace(b"\r\n ", b" ") == f"Subject: {value}\r\n".encode()
    assert all(len(line) <= 78 for line in folded.split(b"\r\n"))


def test_a_word_too_long_for_any_line_is_refused() -> None:
    with pytest.raises(HeaderInjection, match="too long"):
        fold("List-Id", "x" * 990)


@pytest.mark.parametrize("value", ["a\r\nBcc: x", "a\nb", "a\rb", "a\r\n", "a\x00b"])
def test_fold_refuses_line_breaks_that_are_not_folds(value: str) -> None:
    # Given a value whose CR/LF is not CRLF followed by white space
    # Then fold(), the last writer of header bytes, refuses it
    with pytest.raises(HeaderInjection):
        fold("X-Test", value)


def test_fold_refuses_non_ascii_and_bad_names() -> None:
    with pytest.raises(ValueError):
        fold("Subject", "Grüße")
    with pytest.raises(ValueError):
        fold("Bad Name", "x")
    with pytest.raises(ValueError):
        fold("Bad:Name", "x")
