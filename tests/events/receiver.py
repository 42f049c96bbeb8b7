"""A caller's webhook receiver for tests: a real HTTP server on a loopback port.

It records every request (path, headers, body) and answers each path from a plan of
answers, in order, then 200 once the plan is used up: a status, a ``Location`` for
redirects, and a delay before answering (to make a sender time out).
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: The longest a planned delay may hold a request (seconds), so no test hangs.
MAX_DELAY = 5.0


@dataclass(frozen=True)
class Answer:
    """How the receiver answers one request."""

    status: int = 200
    location: str | None = None
    delay: float = 0.0


@dataclass(frozen=True)
class Hit:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """Records requests and answers them from per-path plans."""

    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server
        self.port: int = server.server_address[1]
        self.tls = False
        self._lock = threading.Lock()
        self._hits: list[Hit] = []
        self._plans: dict[str, list[Answer]] = {}

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """The receiver's URL for ``path`` (https when it was started with TLS)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def plan(self, path: str, *answers: Answer) -> None:
        """Answer the next requests to ``path`` with ``answers``, in order."""
        with self._lock:
            self._plans[path] = list(answers)

    def hits(self, path: str | None = None) -> list[Hit]:
        """The requests so far, all or to ``path``."""
        with self._lock:
            return [h for h in self._hits if path is None or h.path == path]

    def _take(self, path: str, hit: Hit) -> Answer:
        with self._lock:
            self._hits.append(hit)
            plan = self._plans.get(path)
            return plan.pop(0) if plan else Answer()


def _handler(receiver_ref: list[Receiver]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            answer = receiver_ref[0]._take(self.path, Hit(self.path, headers, body,
                                                          time.monotonic()))
            if answer.delay:
                time.sleep(min(answer.delay, MAX_DELAY))
            try:
                self.send_response(answer.status)
                if answer.location:
                    self.send_header("Location", answer.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except (BrokenPipeError, ConnectionResetError):
                return  # the sender gave up waiting (a timeout test): nothing to answer

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: the test output is for the tests

    return Handler


def tls_contexts(name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throw-away certificate for the DNS name ``name`` only (not for any IP address):
    ``(server context, client context trusting it)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cadata=cert_pem.decode("ascii"))


@contextmanager
def running_receiver(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A receiver on 127.0.0.1 and a free port (HTTPS with ``tls``), stopped on exit."""
    ref: list[Receiver] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(ref))
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    receiver = Receiver(server)
    receiver.tls = tls is not None
    ref.append(receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
