"""The sink's web view: listing and parsing of captured mail, and its HTTP answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from mailer.smtp.sink import MessageStore
from mailer.smtp.sink_view import (
    PAGE_POLICY,
    Mailbox,
    SinkView,
    ViewPortUnavailable,
    index_page,
    message_page,
    parse,
)

WRITTEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def mail(subject: str, *, text: str | None = "Hello there.\n", html: str | None = None,
         to: str = "Ada Lovelace <ada@example.org>", date: str | None = None) -> bytes:
    """A message as the worker would send it: text and/or HTML, CRLF line ends."""
    message = EmailMessage()
    message["From"] = "Mailer <no-reply@example.com>"
    message["To"] = to
    message["Subject"] = subject
    if date is not None:
        message["Date"] = date
    message["Message-ID"] = "<1@example.com>"
    if text is not None:
        message.set_content(text)
        if html is not None:
            message.add_alternative(html, subtype="html")
    elif html is not None:
        message.set_content(html, subtype="html")
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


@pytest.fixture
def store(tmp_path: Path) -> MessageStore:
    """The capturing sink's own writer, on a fresh directory."""
    return MessageStore(tmp_path / "sink")


@pytest.fixture
def view(store: MessageStore) -> Iterator[str]:
    """The view served on a free loopback port; yields its base URL."""
    with SinkView(store.directory, 0) as running:
        yield running.url.rstrip("/")


# -- listing and parsing -----------------------------------------------------------------


def test_the_list_is_newest_first_with_decoded_headers(store: MessageStore) -> None:
    # Given three messages stored one after the other, one with RFC 2047 words
    first = store.save(mail("First", date="Fri, 02 Jan 2026 10:00:00 +0100"))
    second = store.save(mail("=?utf-8?q?Caf=C3=A9_au_lait?=",
                             to="=?utf-8?q?Ren=C3=A9e?= <renee@example.org>"))
    third = store.save(mail("Third"))
    # (the same second on a coarse clock: the name, arrival time and counter, breaks the tie)
    for path in (first, second, third):
        os.utime(path, ns=(1_700_000_000_000_000_000,) * 2)
    # When the mailbox lists them
    summaries, total = Mailbox(store.directory).summaries()
    # Then the newest comes first, with decoded subject and recipient
    assert total == 3
    assert [s.name for s in summaries] == [third.name, second.name, first.name]
    assert summaries[1].subject == "Café au lait"
    assert summaries[1].to == "Renée <renee@example.org>"
    assert summaries[2].sender == "Mailer <no-reply@example.com>"
    assert summaries[2].date == "2026-01-02 10:00:00 +0100"


def test_the_list_skips_temporaries_and_other_files_and_honours_its_limit(
    store: MessageStore,
) -> None:
    # Given two messages, a half-written temporary, a non-.eml file and a sub-directory
    store.save(mail("One"))
    kept = store.save(mail("Two"))
    (store.directory / f".{kept.name}.tmp").write_bytes(b"Subject: half\r\n")
    (store.directory / "notes.txt").write_text("not mail")
    (store.directory / "dir.eml").mkdir()
    mailbox = Mailbox(store.directory)
    # When it lists at most one
    summaries, total = mailbox.summaries(limit=1)
    # Then it counts the two messages only and shows the newest
    assert [s.subject for s in summaries] == ["Two"]
    assert total == 2
    assert mailbox.names() == [kept.name, mailbox.names()[1]] and len(mailbox.names()) == 2


def test_a_missing_directory_is_an_empty_list(tmp_path: Path) -> None:
    assert Mailbox(tmp_path / "never-created").summaries() == ([], 0)


def test_parse_finds_the_text_and_html_parts_and_every_header() -> None:
    # Given a multipart/alternative message with an 8-bit subject encoded per RFC 2047
    raw = mail("Grüße", text="Plain words.\n", html="<p>Rich <b>words</b></p>")
    # When it is parsed
    captured = parse("x.eml", raw, WRITTEN)
    # Then both parts and the headers in order come back decoded
    assert captured.text == "Plain words.\n"
    assert captured.html is not None and "<b>words</b>" in captured.html
    assert [name for name, _ in captured.headers][:4] == ["From", "To", "Subject", "Message-ID"]
    assert captured.summary.subject == "Grüße"
    # (no Date header: the file's time stands in)
    assert captured.summary.date == "2026-01-02 03:04:05 +0000"
    assert captured.raw == raw


def test_parse_survives_broken_mail() -> None:
    # Given a message with an unknown charset, a malformed date and raw 8-bit header bytes
    raw = (b"From: \xff\xfe <x@example.com>\r\nSubject: odd\r\nDate: yesterday-ish\r\n"
           b"Content-Type: text/plain; charset=x-unknown-charset\r\n\r\nbody \xe9\r\n")
    # When it is parsed
    captured = parse("broken.eml", raw, WRITTEN)
    # Then nothing raises: the date is shown as written and the text as far as it decodes
    assert captured.summary.date == "yesterday-ish"
    assert captured.text is not None and captured.text.startswith("body ")
    assert captured.html is None


def test_only_listed_names_can_be_read(store: MessageStore, tmp_path: Path) -> None:
    # Given a message in the sink and a secret beside the sink's directory
    stored = store.save(mail("Mine"))
    (tmp_path / "secret.eml").write_bytes(mail("Secret"))
    mailbox = Mailbox(store.directory)
    # Then only the listed name opens; anything that leads elsewhere is unknown
    captured = mailbox.get(stored.name)
    assert captured is not None and captured.summary.subject == "Mine"
    for name in ("../secret.eml", "..", "/etc/passwd", f"./{stored.name}", f"{stored.name}/",
                 f".{stored.name}.tmp", ""):
        assert mailbox.get(name) is None, name


# -- pages -------------------------------------------------------------------------------


def test_pages_escape_everything_the_mail_says() -> None:
    # Given a message whose headers and parts try to inject markup
    raw = mail("<script>alert(1)</script>", to="\"<img src=x>\" <a@example.org>",
               text="<b>not bold</b>", html="<p onclick=x>\"quoted\" & <script>bad()</script>")
    captured = parse("m.eml", raw, WRITTEN)
    # When both pages are rendered
    listing = index_page([captured.summary], 1)
    page = message_page(captured)
    # Then no mail markup reaches the page as markup: it is text, or inside srcdoc quoted
    for html_page in (listing, page):
        assert "<script>" not in html_page and "<img src=x>" not in html_page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page
    [srcdoc] = [chunk.split('"', 1)[0] for chunk in page.split('srcdoc="')[1:]]
    assert '"' not in srcdoc and "<" not in srcdoc
    # And the frame is sandboxed without scripts, with its own CSP inside
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in page
    assert "allow-scripts" not in page and "allow-same-origin" not in page
    assert "Content-Security-Policy" in srcdoc.replace("&quot;", '"')


def test_an_empty_sink_says_so() -> None:
    assert "No mail captured yet." in index_page([], 0)


# -- HTTP --------------------------------------------------------------------------------


def test_http_serves_the_list_a_message_and_its_source(store: MessageStore, view: str) -> None:
    # Given one captured message
    raw = mail("Welcome", text="Confirm here.\n", html="<p>Confirm</p>")
    stored = store.save(raw)
    # When the list, the message and its source are fetched
    listing = httpx.get(view + "/", timeout=5)
    page = httpx.get(f"{view}/m/{stored.name}", timeout=5)
    source = httpx.get(f"{view}/m/{stored.name}/raw", timeout=5)
    # Then each answers 200 with a strict CSP, and the source is the stored bytes
    assert listing.status_code == page.status_code == source.status_code == 200
    assert f'href="/m/{stored.name}"' in listing.text and "Welcome" in listing.text
    assert "Confirm here." in page.text
    assert listing.headers["content-security-policy"] == PAGE_POLICY
    assert page.headers["content-security-policy"] == PAGE_POLICY
    assert "default-src 'none'" in source.headers["content-security-policy"]
    assert "sandbox" in source.headers["content-security-policy"]
    assert source.headers["content-type"] == "text/plain; charset=utf-8"
    assert source.headers["x-content-type-options"] == "nosniff"
    assert source.content == raw


@pytest.mark.parametrize("path", [
    "/m/..%2F..%2Fetc%2Fpasswd", "/m/%2e%2e", "/m/../secret.eml", "/secret.eml",
    "/m/nothing.eml", "/m/", "/m/x.eml/raw/more",
])
def test_http_refuses_paths_that_name_no_listed_message(
    store: MessageStore, view: str, tmp_path: Path, path: str
) -> None:
    # Given a secret file one level above the sink's directory
    (tmp_path / "secret.eml").write_bytes(mail("Secret"))
    # When a path tries to reach it (or names nothing), sent as written, unnormalised
    with socket.create_connection(("127.0.0.1", int(view.rsplit(":", 1)[1])), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    # Then it is a 404 and the secret is not in the answer
    assert reply.startswith(b"HTTP/1.0 404"), reply[:100]
    assert b"Secret" not in reply


def test_http_answers_only_to_loopback_host_names(store: MessageStore, view: str) -> None:
    # Given a captured message
    store.save(mail("Private"))
    port = view.rsplit(":", 1)[1]
    # When a page that re-bound its DNS name to 127.0.0.1 asks, the Host is its own: refused
    rebound = httpx.get(view + "/", headers={"Host": f"attacker.example:{port}"}, timeout=5)
    assert rebound.status_code == 403 and "Private" not in rebound.text
    # And the loopback names are served
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert httpx.get(view + "/", headers={"Host": host}, timeout=5).status_code == 200


def test_http_is_read_only(view: str) -> None:
    reply = httpx.post(view + "/", content=b"x", timeout=5)
    assert reply.status_code == 405 and reply.headers["allow"] == "GET, HEAD"


def test_a_taken_port_is_one_clear_error(tmp_path: Path) -> None:
    # Given a port another program listens on
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        # Then the view refuses to start, naming the port and how to choose another
        with pytest.raises(ViewPortUnavailable, match=f"127.0.0.1:{port} .*--view-port"):
            SinkView(tmp_path, port)


def test_mailer_sink_with_a_taken_view_port_says_so_in_one_line(tmp_path: Path) -> None:
    # Given a port another program listens on
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        # When `mailer sink` is asked to serve its view there
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        done = subprocess.run(
            [str(Path(sys.executable).parent / "mailer"), "sink", "--port", "0",
             "--view-port", str(port), "--dir", str(tmp_path / "sink")],
            cwd=tmp_path, env={**env, "MAILER_ENV": "development"}, capture_output=True,
            text=True, timeout=60)
    # Then it stops at once with one line naming the port, and no traceback
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"mailer: cannot serve the sink view on 127.0.0.1:{port} ")
    assert "Traceback" not in done.stderr and done.stdout == ""
