"""The hand-built MIME message (mailer.mail.mime), its DKIM signature and the derived text part."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import re
import smtplib
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.config import Settings
from mailer.errors import ConfigError, HeaderInjection, InvalidAddress
from mailer.mail import mime
from mailer.mail.dkim import DkimSigner
from mailer.mail.mime import Envelope, MessageBuilder
from mailer.mail.text import html_to_text
from tests.mail.test_headers import INJECTIONS
from tests.smtp_servers import running_smtp_server

WHEN = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC)
PROMO_HEADERS = (
    ("List-Unsubscribe", "<https://mail.example.com/u/v1.eyJsIjoiZGVhbHMifQ.sig>"),
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ("List-Id", "Example Deals <deals.lists.example.com>"),
)
SMUGGLING = "line one\n.\nline two\r\n.\r\nline three\n.\r\nfour\r.\r\n.\n..\n"


@pytest.fixture
def builder() -> MessageBuilder:
    return MessageBuilder("Example Shop <shop@example.com>", "Support <help@example.com>")


def build(builder: MessageBuilder, **overrides: Any) -> Envelope:
    """Build a message with sensible defaults, overriding the given fields."""
    fields: dict[str, Any] = {
        "to_email": "jane@example.org",
        "to_name": "Jane Doe",
        "subject": "Your weekly deals",
        "html": "<p>Hello <b>Jane</b></p>",
        "text": "Hello Jane",
        "message_id": "<0190a1b2.c3d4@mail.example.com>",
        "date": WHEN,
        "extra_headers": PROMO_HEADERS,
    }
    fields.update(overrides)
    return builder.build(**fields)


def parse(envelope: Envelope) -> EmailMessage:
    msg = email.message_from_bytes(envelope.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def header_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# --- structure and headers ------------------------------------------------------------

def test_the_message_parses_back_to_exactly_the_expected_headers(
    builder: MessageBuilder,
) -> None:
    # Given a promotion to Jane
    envelope = build(builder)
    msg = parse(envelope)
    # Then the stdlib sees exactly these headers, in this order, with these values
    content_type = msg["Content-Type"]
    boundary = content_type.params["boundary"]
    assert [(name, str(value)) for name, value in msg.items()] == [
        ("From", "Example Shop <shop@example.com>"),
        ("To", "Jane Doe <jane@example.org>"),
        ("Subject", "Your weekly deals"),
        ("Date", "Fri, 14 Mar 2025 15:09:26 +0000"),
        ("Message-ID", "<0190a1b2.c3d4@mail.example.com>"),
        ("MIME-Version", "1.0"),
        ("Reply-To", "Support <help@example.com>"),
        *PROMO_HEADERS,
        ("Content-Type", f'multipart/alternative; boundary="{boundary}"'),
    ]
    assert msg.defects == []
    # And it is multipart/alternative: text/plain then text/html, UTF-8, ASCII as 7bit
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
    for part in parts:
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "7bit"
        assert part.defects == []
    assert parts[0].get_content() == "Hello Jane"
    assert parts[1].get_content() == "<p>Hello <b>Jane</b></p>"
    # And the envelope sender is the From address, the recipient the To address
    assert envelope.sender == "shop@example.com"
    assert envelope.recipients == ("jane@example.org",)


def test_without_reply_to_or_extras_only_the_core_headers_are_written() -> None:
    # Given no Reply-To configured and a transactional message (no List-* headers)
    envelope = build(MessageBuilder("shop@example.com", None), to_name=None, extra_headers=())
    msg = parse(envelope)
    # Then From is the bare address and no Reply-To or List-Unsubscribe is present
    assert list(msg.keys()) == [
        "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
    ]
    assert str(msg["From"]) == "shop@example.com"
    assert str(msg["To"]) == "jane@example.org"


def test_every_line_ends_in_crlf_and_stays_within_78_characters(
    builder: MessageBuilder,
) -> None:
    envelope = build(builder, html="<p>" + "word " * 2000 + "</p>", text=None,
                     subject="Grüße " * 40)
    data = envelope.data
    assert data.endswith(b"\r\n")
    # No bare CR or LF anywhere: every line break is CRLF
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 78


def test_message_id_is_preserved_and_the_date_keeps_its_offset(
    builder: MessageBuilder,
) -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5)))
    msg = parse(build(builder, message_id="<a.b-c_d@x.example>", date=when))
    assert msg["Message-ID"] == "<a.b-c_d@x.example>"
    assert msg["Date"].datetime == when
    assert str(msg["Date"]) == "Thu, 02 Jan 2025 03:04:05 -0500"


def test_each_message_gets_its_own_moment_in_its_own_offset(builder: MessageBuilder) -> None:
    # Given messages built one after another: the same instant twice, then the same
    # instant in another zone, then a later one (the builder keeps the last Date field)
    utc = datetime(2025, 1, 2, 8, 4, 5, tzinfo=UTC)
    dates = [utc, utc, utc.astimezone(timezone(timedelta(hours=-5))), utc + timedelta(seconds=1)]
    fields = [str(parse(build(builder, date=d))["Date"]) for d in dates]
    # Then each Date field says its own moment, in its own offset
    assert fields == ["Thu, 02 Jan 2025 08:04:05 +0000", "Thu, 02 Jan 2025 08:04:05 +0000",
                      "Thu, 02 Jan 2025 03:04:05 -0500", "Thu, 02 Jan 2025 08:04:06 +0000"]


def test_a_naive_date_is_taken_as_utc(builder: MessageBuilder) -> None:
    # Given a naive timestamp, as SQLite hands back
    msg = parse(build(builder, date=datetime(2025, 3, 14, 15, 9, 26)))
    assert msg["Date"].datetime == WHEN


@pytest.mark.parametrize(
    "message_id",
    ["0190@example.com", "<no-at-sign>", "<a@b>\r\nBcc: x@y.z", "<a b@c>", "<a@b><c@d>",
     "<=?utf-8?q?x?=@example.com>", "<>", "<" + "a" * 990 + "@b>"],
)
def test_malformed_message_ids_are_refused(builder: MessageBuilder, message_id: str) -> None:
    with pytest.raises(HeaderInjection, match=r"^message_id: "):
        build(builder, message_id=message_id)


# --- subjects and display names -------------------------------------------------------

@pytest.mark.parametrize(
    "subject",
    [
        "Grüße aus Köln",
        "🎉🥳 Party tonight 🎉",
        "会议纪要第三季度报告" * 30,  # 300 CJK characters
        "A long plain subject line " * 11 + "end",  # ~300 characters
        "=?utf-8?q?hello_world?=",  # literal text that looks like an encoded-word
        "x" * 900,  # nowhere to fold: split across encoded-words instead
        "",
    ],
)
def test_subjects_round_trip_exactly_within_line_limits(
    builder: MessageBuilder, subject: str,
) -> None:
    envelope = build(builder, subject=subject)
    # Then the stdlib decodes exactly the subject given
    assert str(parse(envelope)["Subject"]) == subject
    # And no Subject line exceeds 78 characters (998 is the hard limit)
    lines = header_lines(envelope.data)
    start = next(i for i, line in enumerate(lines) if line.startswith(b"Subject:"))
    subject_lines = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(b" "):
            break
        subject_lines.append(line)
    assert all(len(line) <= 78 for line in subject_lines)


@pytest.mark.parametrize(
    "name",
    ['Doe, Jane "JD"', "back\\slash", "Jürgen Müller", 'evil@example.net" <evil@example.net>'],
)
def test_display_names_round_trip(builder: MessageBuilder, name: str) -> None:
    (address,) = parse(build(builder, to_name=name))["To"].addresses
    assert (address.display_name, address.addr_spec) == (name, "jane@example.org")


@pytest.mark.parametrize("payload", INJECTIONS.values(), ids=INJECTIONS.keys())
@pytest.mark.parametrize("field", ["subject", "to_name", "extra"])
def test_injection_payloads_are_refused_in_every_caller_field(
    builder: MessageBuilder, field: str, payload: str,
) -> None:
    # Given an injection payload in the subject, the display name or a List-* header
    overrides: dict[str, Any] = (
        {"extra_headers": [("List-Id", payload)]} if field == "extra" else {field: payload}
    )
    # Then nothing is built and the caller gets a 422 naming the field
    with pytest.raises(HeaderInjection) as caught:
        build(builder, **overrides)
    assert str(caught.value).startswith("List-Id: " if field == "extra" else f"{field}: ")


@pytest.mark.parametrize("address", ["jane@example.org\r\nBcc: x@y.z", "jane@bücher.de"])
def test_recipient_addresses_must_be_normalised_ascii(
    builder: MessageBuilder, address: str,
) -> None:
    with pytest.raises(InvalidAddress):
        build(builder, to_email=address)


@pytest.mark.parametrize(
    "name", ["From", "to", "SUBJECT", "Bcc", "Cc", "Reply-To", "Content-Type", "Sender",
             "DKIM-Signature", "X Bad", "X:Bad", "X_Bad", "", "X-Ünicode"],
)
def test_extra_headers_cannot_repeat_core_fields_or_use_odd_names(
    builder: MessageBuilder, name: str,
) -> None:
    with pytest.raises(HeaderInjection):
        build(builder, extra_headers=[(name, "value")])


def test_extra_header_values_must_be_ascii(builder: MessageBuilder) -> None:
    # RFC 2369: List-* fields are never RFC 2047-encoded
    with pytest.raises(HeaderInjection, match=r"^List-Id: must be ASCII"):
        build(builder, extra_headers=[("List-Id", "Angebote <angebote.example.com> Grüße")])


def test_configured_sender_with_an_injection_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        MessageBuilder("Shop <shop@example.com>", "Help\r\nBcc: x@y.z <help@example.com>")


# --- bodies ---------------------------------------------------------------------------

def crlf(text: str) -> bytes:
    """``text`` with every line break spelled CRLF, as RFC 2046 section 4.1.1 wants."""
    return re.sub(r"\r\n|\r|\n", "\r\n", text).encode()


def test_smuggling_sequences_become_crlf_lines_and_decode_identically(
    builder: MessageBuilder,
) -> None:
    # Given bodies full of SMTP end-of-data look-alikes (bare LF or CR around a ".")
    html = "<p>" + SMUGGLING + "</p>"
    envelope = build(builder, text=SMUGGLING, html=html)
    # Then the message holds no bare CR or LF and no line that is a lone "."
    assert b"\r" not in envelope.data.replace(b"\r\n", b"")
    assert b"\n" not in envelope.data.replace(b"\r\n", b"")
    assert b"." not in envelope.data.split(b"\r\n")
    # And both parts decode to the text given, its line breaks as CRLF
    text_part, html_part = parse(envelope).iter_parts()
    assert text_part.get_payload(decode=True) == crlf(SMUGGLING)
    assert html_part.get_payload(decode=True) == crlf(html)


def test_a_smuggling_body_arrives_as_exactly_one_intact_message() -> None:
    # Given a real in-process SMTP relay and a message whose body contains "\n.\n"
    builder = MessageBuilder("Example Shop <shop@example.com>", None)
    envelope = build(builder, text=SMUGGLING, html="<pre>" + SMUGGLING + "</pre>")
    with running_smtp_server() as (host, port, recorder):
        # When it is sent over SMTP
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.sendmail(envelope.sender, list(envelope.recipients), envelope.data)
        received = recorder.messages
    # Then exactly one message arrived, with the headers and body that were built
    assert len(received) == 1
    (message,) = received
    assert message.mail_from == "shop@example.com"
    assert message.rcpt_tos == ("jane@example.org",)
    assert message.data.rstrip(b"\r\n") == envelope.data.rstrip(b"\r\n")
    arrived = email.message_from_bytes(message.data, policy=email.policy.default)
    assert arrived.keys() == parse(envelope).keys()
    text_part, _ = arrived.iter_parts()
    assert text_part.get_payload(decode=True) == crlf(SMUGGLING)


def test_the_boundary_is_random_and_cannot_collide_with_a_body(
    builder: MessageBuilder,
) -> None:
    # Given a body that tries to close the multipart early with a guessed boundary
    html = "<p>--=_00000000000000000000000000000000--\r\n--=_</p>"
    first, second = build(builder, html=html), build(builder, html=html)
    boundary = parse(first)["Content-Type"].params["boundary"]
    # Then boundaries differ per message and hold 128 random bits after "=_"
    assert boundary != parse(second)["Content-Type"].params["boundary"]
    assert re.fullmatch(r"=_[0-9a-f]{32}", boundary)
    # And the boundary appears in neither decoded body, and the message has two parts
    parts = list(parse(first).iter_parts())
    assert len(parts) == 2
    for part in parts:
        assert boundary.encode() not in part.get_payload(decode=True)


def test_the_text_part_is_derived_from_html_when_not_given(builder: MessageBuilder) -> None:
    html = '<h1>Deals</h1><p>See <a href="https://example.com/d">this week</a>.</p>'
    text_part, _ = parse(build(builder, html=html, text=None)).iter_parts()
    assert text_part.get_content() == "Deals\r\n\r\nSee this week (https://example.com/d)."


def test_non_ascii_and_lone_surrogates_in_bodies_do_not_break_the_build(
    builder: MessageBuilder,
) -> None:
    envelope = build(builder, text="Grüße 🎉 \ud800", html="<p>会议</p>")
    text_part, html_part = parse(envelope).iter_parts()
    assert text_part.get_content() == "Grüße 🎉 ?"
    assert html_part.get_content() == "<p>会议</p>"


# --- DKIM -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def signed_builder(rsa_key: rsa.RSAPrivateKey) -> MessageBuilder:
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    signer = DkimSigner("example.com", "s1", pem)
    return MessageBuilder("Example Shop <shop@example.com>", None, signer)


def verify(data: bytes, key: rsa.RSAPrivateKey, lookups: list[bytes] | None = None) -> bool:
    """Verify with dkimpy against an in-memory TXT record (no DNS)."""
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        if lookups is not None:
            lookups.append(name)
        return record

    return bool(dkim.verify(data, dnsfunc=dnsfunc))


def test_a_signed_promotion_verifies_and_covers_both_list_unsubscribe_headers(
    signed_builder: MessageBuilder, rsa_key: rsa.RSAPrivateKey,
) -> None:
    # Given a promotion built with a DKIM signer
    envelope = build(signed_builder, text=None, subject="Grüße 🎉", to_name="Jürgen")
    # Then the DKIM-Signature comes first and verifies against the published key
    assert envelope.data.startswith(b"DKIM-Signature: ")
    lookups: list[bytes] = []
    assert verify(envelope.data, rsa_key, lookups)
    assert lookups == [b"s1._domainkey.example.com."]
    # And h= covers List-Unsubscribe and List-Unsubscribe-Post (RFC 8058 section 3.1)
    msg = parse(envelope)
    tags = dict(
        tag.strip().split("=", 1) for tag in re.sub(r"\s+", "", str(msg["DKIM-Signature"]))
        .split(";") if tag
    )
    signed = tags["h"].split(":")
    assert {"from", "list-unsubscribe", "list-unsubscribe-post", "list-id"} <= set(signed)
    assert signed.count("list-unsubscribe-post") == 2  # oversigned
    assert (tags["d"], tags["s"], tags["a"], tags["c"]) == (
        "example.com", "s1", "rsa-sha256", "relaxed/relaxed"
    )
    # And the rest of the message still parses to the unsigned header set
    assert list(msg.keys())[1:4] == ["From", "To", "Subject"]


@pytest.mark.parametrize(
    ("label", "old", "new"),
    [
        ("changed one-click value", b"List-Unsubscribe=One-Click", b"List-Unsubscribe=Other"),
        ("second List-Unsubscribe", b"MIME-Version: 1.0\r\n",
         b"MIME-Version: 1.0\r\nList-Unsubscribe: <https://evil.example/u>\r\n"),
        ("added List-Unsubscribe-Post", b"MIME-Version: 1.0\r\n",
         b"MIME-Version: 1.0\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"),
        ("added Reply-To", b"MIME-Version: 1.0\r\n",
         b"MIME-Version: 1.0\r\nReply-To: evil@example.net\r\n"),
        ("changed subject", b"Subject: Your weekly deals", b"Subject: Your weekly dealz"),
    ],
)
def test_tampering_after_signing_breaks_the_signature(
    signed_builder: MessageBuilder, rsa_key: rsa.RSAPrivateKey, label: str, old: bytes, new: bytes,
) -> None:
    data = build(signed_builder).data
    assert verify(data, rsa_key)
    tampered = data.replace(old, new, 1)
    assert tampered != data, label
    assert not verify(tampered, rsa_key)


def test_a_changed_body_breaks_the_signature(
    signed_builder: MessageBuilder, rsa_key: rsa.RSAPrivateKey,
) -> None:
    data = build(signed_builder, text="Hello Jane").data
    assert verify(data, rsa_key)
    assert not verify(data.replace(b"Hello Jane", b"Hello Joan"), rsa_key)


def test_relaxed_canonicalisation_survives_refolding(
    signed_builder: MessageBuilder, rsa_key: rsa.RSAPrivateKey,
) -> None:
    # Given a relay that re-folds a header and pads a body line with trailing spaces
    data = build(signed_builder).data
    refolded = data.replace(b"Subject: Your weekly deals", b"Subject: Your\r\n  weekly deals")
    head, body = refolded.split(b"\r\n\r\n", 1)
    # Then the signature still verifies
    assert verify(head + b"\r\n\r\n" + body.replace(b"\r\n", b"  \r\n", 1), rsa_key)


def pem_of(key: Any, fmt: serialization.PrivateFormat) -> bytes:
    return bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))


def test_pkcs1_keys_work_too(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = pem_of(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL)
    signer = DkimSigner("Example.COM", "s1", pem)
    data = build(MessageBuilder("shop@example.com", None, signer)).data
    assert b" d=example.com;" in data.split(b"\r\n\r\n")[0]
    assert verify(data, rsa_key)


@pytest.mark.parametrize(
    ("domain", "selector", "pem", "message"),
    [
        ("example.com", "s1", b"not a key", "not an unencrypted PEM"),
        ("example.com", "s1", "ec", "must be RSA"),
        ("exa mple.com", "s1", "rsa", "DNS names"),
        ("example.com", "s1;x=1", "rsa", "DNS names"),
    ],
)
def test_bad_dkim_configuration_is_a_config_error(
    rsa_key: rsa.RSAPrivateKey, domain: str, selector: str, pem: Any, message: str,
) -> None:
    if pem == "ec":
        pem = pem_of(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8)
    elif pem == "rsa":
        pem = pem_of(rsa_key, serialization.PrivateFormat.PKCS8)
    with pytest.raises(ConfigError, match=message):
        DkimSigner(domain, selector, pem)


def test_from_settings(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    # Given no DKIM settings, then no signer
    assert DkimSigner.from_settings(Settings()) is None
    # Given only some of them, then a configuration error
    with pytest.raises(ConfigError, match="all of"):
        DkimSigner.from_settings(Settings(dkim_domain="example.com"))
    # Given a key file that does not exist, then a configuration error
    with pytest.raises(ConfigError, match="cannot read"):
        DkimSigner.from_settings(Settings(
            dkim_domain="example.com", dkim_selector="s1",
            dkim_private_key_file=str(tmp_path / "missing.pem"),
        ))
    # Given all three, then a working signer
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(pem_of(rsa_key, serialization.PrivateFormat.PKCS8))
    signer = DkimSigner.from_settings(Settings(
        dkim_domain="example.com", dkim_selector="s1", dkim_private_key_file=str(key_file),
    ))
    assert signer is not None
    assert verify(build(MessageBuilder("shop@example.com", None, signer)).data, rsa_key)


# --- html_to_text ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>Hello   <b>world</b>,\n  again</p>", "Hello world, again"),
        ("<html><head><title>T</title><style>p{color:red}</style></head>"
         "<body><p>Body</p><script>alert(1)</script></body></html>", "Body"),
        ("<head><title>never closed<body><p>Shown</p>", "Shown"),
        ("<p>One</p><p>Two</p>", "One\n\nTwo"),
        ("<div>One</div><div>Two</div>", "One\nTwo"),
        ("<h1>Title</h1>Text", "Title\n\nText"),
        ("a<br>b<br/>c<br><br>d", "a\nb\nc\n\nd"),
        ("<ul><li>one</li><li> two </li></ul>", "- one\n- two"),
        ("<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul>", "- a\n  - b\n- c"),
        ('<a href="https://example.com/x">Example</a>', "Example (https://example.com/x)"),
        ('<a href="https://example.com/">https://example.com/</a>', "https://example.com/"),
        ('<a href="https://example.com/"></a>', "https://example.com/"),
        ('x<a href="https://e.com"> y </a>z', "x y (https://e.com) z"),
        ('<a href="#top">Top</a>', "Top"),
        ('<a href="https://e.com/s"><img src="b.png" alt="Shop now"></a>',
         "Shop now (https://e.com/s)"),
        ('<img src="pixel.gif" alt="">', ""),
        ("Fish &amp; chips &lt;3 &eacute;&#233;&#x e9;", "Fish & chips <3 éé&#x e9;"),
        ("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>", "a b\nc"),
        ("<pre>  keep\n    indent</pre>", "keep\n    indent"),
        ("<!-- hidden comment --><p>Shown</p>", "Shown"),
        ("", ""),
    ],
)
def test_html_to_text(html: str, text: str) -> None:
    assert html_to_text(html) == text


def test_html_to_text_keeps_the_url_of_a_link_with_entities() -> None:
    html = '<a href="https://example.com/u?a=1&amp;b=2">Unsubscribe</a>'
    assert html_to_text(html) == "Unsubscribe (https://example.com/u?a=1&b=2)"


# --- text parts as a plain-text reader sees them (SPEC 6) -------------------------------

@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("Hello Jane,\nyour order shipped.", "7bit"),
        ("Grüße aus Köln, Ihre Bestellung ist unterwegs.", "quoted-printable"),
        ("a line with a NUL \x00 in it", "quoted-printable"),
        ("a vertical tab \x0b and a DEL \x7f", "quoted-printable"),
        ("tabs\tare\tfine ~ {as} is all of ASCII's punctuation: !\"#$%&'()*+,-./", "7bit"),
        ("x" * 1200, "quoted-printable"),
        ("x" * 998 + "\n" + "y" * 998, "7bit"),
        ("first\n.\nlast", "quoted-printable"),
        ("Здравствуйте! Ваш заказ отправлен сегодня.", "base64"),
    ],
    ids=["ascii", "latin", "control", "vt-del", "tab-punctuation", "overlong-line",
         "longest-lines", "lone-dot", "cyrillic"],
)
def test_text_parts_use_the_plainest_encoding_that_carries_them(
    builder: MessageBuilder, text: str, encoding: str,
) -> None:
    # Given a text part of each kind of script
    text_part, _ = parse(build(builder, text=text)).iter_parts()
    # Then it travels in the plainest transfer encoding that fits, and decodes exactly
    assert text_part["Content-Transfer-Encoding"] == encoding
    assert text_part.get_payload(decode=True) == crlf(text)


def test_long_paragraphs_are_wrapped_near_78_without_cutting_words(
    builder: MessageBuilder,
) -> None:
    # Given a derived text part with a long paragraph and a longer URL
    url = "https://example.com/" + "p" * 90
    html = "<p>" + "Your weekly deals are here and waiting for you. " * 6 + "</p>" + \
        f'<p><a href="{url}">all deals</a></p>'
    text_part, _ = parse(build(builder, html=html, text=None)).iter_parts()
    lines = text_part.get_content().splitlines()
    # Then every line holding a space fits in 78 characters, and the URL is whole
    assert all(len(line) <= 78 for line in lines if " " in line)
    assert any(url in line for line in lines)
    # And the words read back in their order
    assert " ".join(" ".join(lines).split()).startswith(
        "Your weekly deals are here and waiting for you. Your weekly"
    )


def test_the_signature_separator_keeps_its_trailing_space(builder: MessageBuilder) -> None:
    # Given a text part whose footer is set off by "-- " (RFC 3676 section 4.3)
    text_part, _ = parse(build(builder, text="Hello\n\n-- \nExample Shop")).iter_parts()
    # Then the separator line reads back as "-- " exactly
    assert "-- " in text_part.get_content().splitlines()


# --- quoted-printable, line by line and remembered -------------------------------------

_QP_TEXT = st.lists(
    st.lists(st.sampled_from([*"ab =.\t\u00e9\u2014\x01\x7f\r", "x" * 40, " " * 3, "y" * 75]),
             max_size=12).map("".join),
    min_size=1, max_size=6).map("\n".join)


@settings(max_examples=300)
@given(_QP_TEXT, st.booleans())
def test_quoted_printable_by_line_equals_the_whole_text_encoded(text: str, wrap: bool) -> None:
    # The whole text through b2a_qp, soft breaks as CRLF: what text_part wrote before
    lines = mime.wrap_text(text) if wrap else mime._lines(text)
    raw = "\r\n".join(lines).encode("utf-8", "replace")
    whole = binascii.b2a_qp(raw, istext=True).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    part = mime.text_part(b"", text, wrap=wrap)
    if b"quoted-printable" in part:
        assert part.split(b"\r\n\r\n", 1)[1] == whole
        # And a second time, from the remembered lines, the same
        assert mime.text_part(b"", text, wrap=wrap) == part


def test_remembered_lines_are_bounded() -> None:
    for n in range(mime._QP_LINES + 10):
        mime._qp_line(f"\u00e9 {n}")
    assert len(mime._qp_cache) <= mime._QP_LINES
    mime._qp_line("\u00e9" * (mime._QP_LINE_CHARS + 1))
    # A remembered line encodes as it did the first time
    assert mime._qp_line("\u00e9 3") == mime._qp("\u00e9 3\r\n")[:-2]
    assert "\u00e9" * (mime._QP_LINE_CHARS + 1) not in mime._qp_cache
