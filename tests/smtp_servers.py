"""Real in-process aiosmtpd relays for tests: a recording handler with switchable fault modes."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

#: Every fault mode :class:`Recorder` understands (None means a well-behaved relay).
FAULTS = frozenset({
    "4xx_rcpt",               # 451 4.3.0 at RCPT: try again later
    "5xx_rcpt_user_unknown",  # 550 5.1.1 at RCPT: no such mailbox
    "partial_rcpt",           # 550 5.1.1 only for recipients whose local part starts "unknown"
    "5xx_policy",             # 550 5.7.1 after the final dot: refused by policy
    "4xx_data",               # 451 4.3.0 after the final dot
    "drop_after_data",        # keep the message, then close the connection without a reply
    "slow_after_data",        # keep the message, then stall past any sane client timeout
})


@dataclass(frozen=True)
class SimpleEnvelope:
    """Stands in for mailer.mail.mime.Envelope: the three fields the transport reads."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


def sample_envelope(n: int = 0, to: str = "rcpt@example.org") -> SimpleEnvelope:
    """A small distinct message numbered ``n``, with a line that needs dot-stuffing."""
    data = (
        f"From: sender@example.com\r\nTo: {to}\r\nSubject: test {n}\r\n"
        f"Message-ID: <{n}@example.com>\r\n\r\nBody line {n}\r\n.leading dot\r\n"
    ).encode("ascii")
    return SimpleEnvelope("sender@example.com", (to,), data)


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the relay accepted (or, for the *_after_data faults, silently kept)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class Recorder:
    """aiosmtpd handler that keeps every message it takes and misbehaves on request."""

    def __init__(self, fault: str | None = None, *, slow_seconds: float = 30.0) -> None:
        self.fault = fault  # may be switched while the server runs
        self.slow_seconds = slow_seconds
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._sessions: list[Any] = []
        self._servers: list[Any] = []
        self._rsets = 0
        self._noops = 0

    @property
    def fault(self) -> str | None:
        """The current fault mode."""
        return self._fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        if value is not None and value not in FAULTS:
            raise ValueError(f"unknown fault mode {value!r}")
        self._fault = value

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages kept so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """How many client connections greeted us (EHLO/HELO); the controller's probe doesn't."""
        with self._lock:
            return len(self._sessions)

    @property
    def rsets(self) -> int:
        """How many RSET commands arrived."""
        with self._lock:
            return self._rsets

    @property
    def noops(self) -> int:
        """How many NOOP commands arrived."""
        with self._lock:
            return self._noops

    def drop_connections(self) -> None:
        """Close every client connection from the server side, as an idle timeout would."""
        with self._lock:
            servers = list(self._servers)
        for server in servers:
            transport = server.transport
            if transport is not None:
                server.loop.call_soon_threadsafe(transport.close)

    def _greeted(self, server: Any, session: Any) -> None:
        with self._lock:
            if not any(s is session for s in self._sessions):
                self._sessions.append(session)
                self._servers.append(server)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        """Count the connection and keep aiosmtpd's EHLO reply."""
        session.host_name = hostname
        self._greeted(server, session)
        return responses

    async def handle_HELO(
        self, server: Any, session: Any, envelope: Any, hostname: str
    ) -> str:
        """Count the connection and answer HELO."""
        session.host_name = hostname
        self._greeted(server, session)
        return f"250 {server.hostname}"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        """Count RSETs so tests can see a failed transaction was cleared."""
        with self._lock:
            self._rsets += 1
        return "250 OK"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        """Count NOOPs so tests can see idle connections being checked."""
        with self._lock:
            self._noops += 1
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        """Accept the recipient unless a RCPT fault says otherwise."""
        if self.fault == "4xx_rcpt":
            return "451 4.3.0 Mailbox temporarily unavailable, try again later"
        if self.fault == "5xx_rcpt_user_unknown" or (
            self.fault == "partial_rcpt" and address.startswith("unknown")
        ):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Keep the message and reply per the fault mode."""
        fault = self.fault
        if fault == "5xx_policy":
            return "550 5.7.1 Message refused by local policy"
        if fault == "4xx_data":
            return "451 4.3.0 Temporary local problem, try again later"
        with self._lock:
            self._messages.append(ReceivedMessage(
                envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.original_content)
            ))
        if fault == "drop_after_data":
            # The relay has the message but the client never hears the 250 (RFC 5321 6.1).
            server.transport.close()
        elif fault == "slow_after_data":
            await asyncio.sleep(self.slow_seconds)  # cancelled when the server stops
        return "250 2.0.0 OK queued"


class _EphemeralController(Controller):
    """aiosmtpd's Controller, taught to listen on port 0 and report the port it got."""

    def _trigger_server(self) -> None:
        server = self.server
        if self.port == 0 and isinstance(server, asyncio.Server):
            self.port = server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@contextmanager
def running_smtp_server(
    handler: Any = None,
    *,
    fault: str | None = None,
    port: int = 0,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    **smtp_kwargs: Any,
) -> Iterator[tuple[str, int, Any]]:
    """Run an aiosmtpd relay on 127.0.0.1 in a thread; yield ``(host, port, handler)``.

    ``handler`` defaults to a :class:`Recorder` with the given ``fault``. With a
    ``tls_context`` the relay offers and requires STARTTLS, or with ``implicit_tls``
    speaks TLS from the first byte. Extra keywords go to ``aiosmtpd.smtp.SMTP``.
    """
    if handler is None:
        handler = Recorder(fault)
    smtp_kwargs.setdefault("enable_SMTPUTF8", False)
    if tls_context is not None and not implicit_tls:
        smtp_kwargs.update(tls_context=tls_context, require_starttls=True)
    controller = _EphemeralController(
        handler,
        hostname="127.0.0.1",
        port=port,
        server_hostname="test-relay",
        ssl_context=tls_context if implicit_tls else None,
        **smtp_kwargs,
    )
    controller.start()
    try:
        yield "127.0.0.1", controller.port, handler
    finally:
        controller.stop()


@contextmanager
def refusing_port() -> Iterator[int]:
    """Yield a loopback port that refuses connections (bound, never listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def make_tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throw-away self-signed certificate for 127.0.0.1: ``(server_ctx, client_ctx)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=cert_pem.decode("ascii"))
    return server, client
