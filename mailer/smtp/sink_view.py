"""A read-only web view of the mail the capturing sink stored, for developers (SPEC 11).

``mailer sink --view-port N`` (and ``mailer dev``, on ``MAILER_SINK_VIEW_PORT``, default
8025 as MailHog's) serves, on loopback only:

- ``/``: the captured messages, newest first (date, from, to, subject);
- ``/m/NAME``: one message: its HTML part in a sandboxed ``<iframe srcdoc>``, its text
  part, its headers;
- ``/m/NAME/raw``: its source, as stored.

Captured mail is untrusted input shown in a browser. The HTML part never shares an origin
with this page: the iframe is ``sandbox``-ed without ``allow-scripts`` (no scripts, no
forms, no meta refresh, an opaque origin), and both the page and the frame carry a
Content-Security-Policy that allows no remote fetches at all, so a tracking pixel or a
remote stylesheet in a captured mail is never requested. Links may open in a new tab
(``allow-popups``): following a confirmation link is what developers come here for.
A NAME is only ever looked up among the names listed from the directory, never joined to
a path, so no request can read a file outside it. The Host header must name loopback, so
a web page that re-binds its own DNS name to 127.0.0.1 cannot read the captured mail.
"""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mailer.errors import MailerError
from mailer.smtp.sink_mailbox import Captured, Mailbox, Summary, parse, summarise
from mailer.smtp.sink_pages import PAGE_POLICY, RAW_POLICY, index_page, message_page

#: The view's port when MAILER_SINK_VIEW_PORT is unset (MailHog's and Mailpit's).
DEFAULT_VIEW_PORT = 8025

_MESSAGE_PATH = re.compile(r"/m/([^/]+)(/raw)?")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})


class ViewPortUnavailable(MailerError):
    """Raised when the view's port cannot be bound (most often: another program has it)."""


class _ViewServer(ThreadingHTTPServer):
    daemon_threads = True
    mailbox: Mailbox


class _Handler(BaseHTTPRequestHandler):
    server: _ViewServer

    def version_string(self) -> str:
        """The Server header: the tool's name, no Python version."""
        return "mailer-sink-view"

    def log_message(self, format: str, *args: object) -> None:
        """Log nothing: paths are harmless, but this is a quiet development tool."""

    def _send(self, status: int, body: bytes, content_type: str, policy: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", policy)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8", RAW_POLICY)

    def _loopback_host(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        # "[::1]:8025" keeps its brackets; "localhost:8025" loses its port.
        host = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
        return host in _LOOPBACK_HOSTS

    def do_GET(self) -> None:
        """Serve the list, a message page or a message's source."""
        if not self._loopback_host():
            self._text(403, "This view answers only to 127.0.0.1, localhost or [::1].\n")
            return
        path = urlsplit(self.path).path
        mailbox = self.server.mailbox
        if path == "/":
            page = index_page(*mailbox.summaries())
            self._send(200, page.encode(), "text/html; charset=utf-8", PAGE_POLICY)
            return
        match = _MESSAGE_PATH.fullmatch(path)
        message = mailbox.get(unquote(match.group(1))) if match else None
        if match is None or message is None:
            self._text(404, "No such message.\n")
        elif match.group(2):
            self._send(200, message.raw, "text/plain; charset=utf-8", RAW_POLICY)
        else:
            self._send(200, message_page(message).encode(), "text/html; charset=utf-8",
                       PAGE_POLICY)

    def do_HEAD(self) -> None:
        """As GET, without the body."""
        self.do_GET()

    def _read_only(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only


class SinkView:
    """The view's HTTP server on a loopback port (0 picks a free one), run in a thread."""

    def __init__(self, directory: Path, port: int, host: str = "127.0.0.1") -> None:
        # Binding here, so a taken port stops the caller before anything starts.
        try:
            self._server = _ViewServer((host, port), _Handler)
        except OSError as exc:
            raise ViewPortUnavailable(
                f"cannot serve the sink view on {host}:{port} ({exc.strerror or exc}): choose "
                "another port with --view-port (MAILER_SINK_VIEW_PORT for mailer dev)"
            ) from None
        self._server.mailbox = Mailbox(directory)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port bound."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Where a browser opens the view."""
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Serve requests from a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="sink-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> SinkView:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["DEFAULT_VIEW_PORT", "Captured", "Mailbox", "SinkView", "Summary",
           "ViewPortUnavailable", "index_page", "message_page", "parse", "summarise"]
