"""Micro-benchmark: µs per message for MessageBuilder against EmailMessage + as_bytes(SMTP).

Run with ``python bench/mime_micro.py``; it prints one line per variant.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed

from mailer.mail.dkim import SIGNED_HEADERS, DkimSigner, relaxed_body
from mailer.mail.mime import MessageBuilder
from mailer.mail.text import _fast_feed, _TextExtractor, html_to_text

ROUNDS = 2000
PARAGRAPH = (
    "<p>Hello Jane, here is this week's selection of articles, offers and news from the "
    '<a href="https://example.com/news?id=42&amp;src=mail">newsroom</a>. '
    "<b>Thank you</b> for reading &mdash; the team.</p>\n"
)
HTML = (
    "<!doctype html><html><head><style>p{margin:0}</style></head><body>"
    + PARAGRAPH * 14
    + "<ul><li>One</li><li>Two</li></ul></body></html>"
)
assert 2900 <= len(HTML.encode()) <= 3300, len(HTML)
TEXT = html_to_text(HTML)
SUBJECT = "Your weekly digest: 12 new articles"
HEADERS = (
    ("List-Unsubscribe", "<https://example.com/u/v1.eyJsIjoiZGVhbHMiLCJ1IjoiMTIzIn0.sig>"),
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ("List-Id", "Example Deals <deals.lists.example.com>"),
)
NOW = datetime.now(UTC)
BUILDER = MessageBuilder("Mailer <no-reply@example.com>", None)
PEM = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
)
SIGNER = DkimSigner("example.com", "s1", PEM)
DUAL_SIGNER = DkimSigner(
    "example.com", "s1", PEM, ed25519_selector="ed1",
    ed25519_private_key=ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ),
)


def hand_built(text: str | None) -> Callable[[int], bytes]:
    """MessageBuilder with the text part given, or derived from the HTML when ``None``."""

    def run(i: int) -> bytes:
        return BUILDER.build(
            to_email=f"user{i}@example.com", to_name="Jane Doe", subject=SUBJECT, html=HTML,
            text=text, message_id=f"<{i}.bench@example.com>", date=NOW, extra_headers=HEADERS,
        ).data

    return run


def dkimpy_sign(i: int) -> bytes:
    """dkimpy's own dkim.sign (pure-Python RSA) over a built message, for comparison."""
    data = hand_built(TEXT)(i)
    header: bytes = dkim.sign(
        data, b"s1", b"example.com", PEM, include_headers=list(SIGNED_HEADERS),
        canonicalize=(b"relaxed", b"relaxed"),
    )
    return header + data


def stdlib(i: int) -> bytes:
    """The obvious design: EmailMessage, then as_bytes with policy.SMTP."""
    msg = EmailMessage()
    msg["From"] = "Mailer <no-reply@example.com>"
    msg["To"] = f"Jane Doe <user{i}@example.com>"
    msg["Subject"] = SUBJECT
    msg["Date"] = format_datetime(NOW)
    msg["Message-ID"] = f"<{i}.bench@example.com>"
    for name, value in HEADERS:
        msg[name] = value
    msg.set_content(TEXT, cte="base64")
    msg.add_alternative(HTML, subtype="html", cte="base64")
    return msg.as_bytes(policy=SMTP)


def regex_reader(html: str) -> str:
    """html_to_text's second reader alone (the regex tokenizer; the only one until now)."""
    parser = _TextExtractor()
    assert _fast_feed(parser, html)
    return "".join(parser.out).strip()


def measure(label: str, func: Callable[[int], object], rounds: int) -> None:
    """Print the best of three runs in µs per message."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(rounds):
            func(i)
        best = min(best, (time.perf_counter() - start) / rounds)
    print(f"{label:<44} {best * 1e6:8.1f} µs/message")


def main() -> None:
    """Run every variant on the same 3 KB HTML body."""
    print(f"HTML body {len(HTML.encode())} bytes, text part {len(TEXT.encode())} bytes")
    measure("MessageBuilder (text given)", hand_built(TEXT), ROUNDS)
    measure("MessageBuilder (text from html_to_text)", hand_built(None), ROUNDS)
    measure("html_to_text alone", lambda i: html_to_text(HTML).encode(), ROUNDS)
    measure("  its regex reader alone (the old path)", lambda i: regex_reader(HTML), ROUNDS)
    measure("EmailMessage + as_bytes(policy=SMTP)", stdlib, ROUNDS // 10)
    built = hand_built(TEXT)(0)
    measure("DkimSigner.signature_header (RSA-2048)", lambda i: SIGNER.signature_header(
        built), ROUNDS // 4)
    measure("  with an Ed25519 signature too", lambda i: DUAL_SIGNER.signature_header(
        built), ROUNDS // 4)
    body = built.split(b"\r\n\r\n", 1)[1]
    measure("  relaxed body canonicalisation (ours)", lambda i: relaxed_body(body), ROUNDS)
    measure("  dkimpy's Relaxed.canonicalize_body", lambda i: Relaxed.canonicalize_body(body),
            ROUNDS)
    measure("MessageBuilder + DkimSigner (RSA-2048)", lambda i: SIGNER.signature_header(
        hand_built(TEXT)(i)), ROUNDS // 4)
    measure("MessageBuilder + dkimpy dkim.sign (RSA-2048)", dkimpy_sign, ROUNDS // 40)


if __name__ == "__main__":
    main()
