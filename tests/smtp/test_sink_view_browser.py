"""The sink's web view in a real Chromium, fed by a real ``mailer sink`` over SMTP."""

from __future__ import annotations

import os
import re
import select
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailer.mail.mime import MessageBuilder
from tests.conftest import ROOT
from tests.scenarios.test_preferences_browser import CHROMIUM_ARGS
from tests.services import chromium_path, require

MAILER = Path(sys.executable).parent / "mailer"
#: How long the sink may take to print both of its start-up lines (seconds).
START_TIMEOUT = 20.0


@contextmanager
def running_sink(store: Path) -> Iterator[tuple[int, str]]:
    """``mailer sink --port 0 --view-port 0``; yields its SMTP port and the view's URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env["MAILER_ENV"] = "development"
    proc = subprocess.Popen(
        [str(MAILER), "sink", "--port", "0", "--view-port", "0", "--dir", str(store)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        while len(lines) < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                lines.append(proc.stdout.readline())
        smtp = re.search(r"sink listening on 127\.0\.0\.1:(\d+)", "".join(lines))
        view = re.search(r"sink view on (http://127\.0\.0\.1:\d+/)", "".join(lines))
        assert smtp and view, f"sink did not start: {lines}"
        yield int(smtp.group(1)), view.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def send(port: int, number: int, subject: str, html: str, text: str) -> None:
    """Build a message as the worker does and send it to the sink with smtplib."""
    envelope = MessageBuilder("Mailer <no-reply@example.com>", None).build(
        to_email="ada@example.org", to_name="Ada Lovelace", subject=subject, html=html,
        text=text, message_id=f"<view-{number}@example.com>", date=datetime.now(UTC))
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(envelope.sender, list(envelope.recipients), envelope.data)


@contextmanager
def trap() -> Iterator[tuple[int, socket.socket]]:
    """A loopback listener that stands for "remote content": nothing may connect to it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        yield listener.getsockname()[1], listener


def test_a_developer_reads_the_newest_captured_mail_in_chromium(tmp_path: Path) -> None:
    require("chromium", chromium_path() is not None, "Debian's chromium is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - depends on the machine
        require("playwright", False, "the playwright Python package is not installed")
        raise
    with running_sink(tmp_path / "sink") as (smtp_port, view), trap() as (trap_port, listener):
        # Given two messages sent to a running sink over SMTP, the second one hostile:
        # a script, a remote image and stylesheet, and a meta refresh, all to the trap
        remote = f"http://127.0.0.1:{trap_port}"
        send(smtp_port, 1, "Your invoice is ready", "<p>Invoice attached.</p>",
             "Invoice attached.")
        send(smtp_port, 2, "Welcome aboard, Ada",
             f'<meta http-equiv="refresh" content="0;url={remote}/refresh">'
             f'<link rel="stylesheet" href="{remote}/style.css">'
             f'<p id="greeting">Hello <b>Ada</b>, welcome.</p><img src="{remote}/pixel.png">'
             "<script>document.body.setAttribute('data-pwned', 'yes')</script>",
             "Hello Ada, welcome.\n\nConfirm your address within a day.")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(),
                                                 args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                requested: list[str] = []
                answered: list[str] = []
                page.on("request", lambda request: requested.append(request.url))
                page.on("response", lambda response: answered.append(response.url))
                # When the developer opens the view
                response = page.goto(view)
                assert response is not None and response.status == 200
                rows = page.locator("tbody tr")
                assert rows.count() == 2
                # Then the newest is listed first, with its recipient
                assert "Welcome aboard, Ada" in rows.nth(0).inner_text()
                assert "Ada Lovelace <ada@example.org>" in rows.nth(0).inner_text()
                assert "Your invoice is ready" in rows.nth(1).inner_text()
                # When they click it
                page.get_by_role("link", name="Welcome aboard, Ada").click()
                page.wait_for_url(re.compile(r"/m/[^/]+\.eml$"))
                # Then they see its subject, its text part and its headers
                assert page.get_by_role("heading", level=1).inner_text() == "Welcome aboard, Ada"
                assert "Confirm your address within a day." in page.locator(
                    "#text-part").inner_text()
                headers = page.locator("table.headers").inner_text()
                assert "Message-ID\t<view-2@example.com>" in headers
                assert "To\tAda Lovelace <ada@example.org>" in headers
                # And the HTML part is rendered, with its script not run
                frame = page.frame_locator("iframe")
                assert frame.locator("#greeting").inner_text() == "Hello Ada, welcome."
                assert frame.locator("body").get_attribute("data-pwned") is None
                page.wait_for_timeout(500)  # time for a refresh or a late fetch to show
                assert frame.locator("#greeting").count() == 1  # no refresh happened
                page.screenshot(path=str(tmp_path / "sink-view.png"), full_page=True)
            finally:
                browser.close()
        # And the browser fetched nothing outside the view, and nothing reached the trap.
        # Chromium may announce a request for the mail's stylesheet or image (its preload
        # scanner runs ahead of the parser, seen once on a busy CI machine) that the
        # policy then blocks: such a request must get no response, and the trap below
        # proves no connection was even opened.
        inside = [url for url in requested if url.startswith(view) or url == "about:srcdoc"]
        assert inside, requested
        assert all(url.startswith(view) or url == "about:srcdoc" for url in answered), answered
        assert all(url.startswith(view) or url.startswith(remote) or url == "about:srcdoc"
                   for url in requested), requested
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert (tmp_path / "sink-view.png").stat().st_size > 10_000
