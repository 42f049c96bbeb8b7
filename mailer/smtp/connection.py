"""One pooled SMTP session to the relay, and the TLS context it verifies the relay with.

A :class:`PooledConnection` is driven through aiosmtplib's commands one at a time or, when
the relay offers PIPELINING (RFC 2920), through :class:`~mailer.smtp.pipelining.Link`,
which then owns the socket; its methods hide which. The pool that opens, reuses and
retires these is :class:`~mailer.smtp.pool.SmtpTransport`.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import aiosmtplib

from mailer.errors import ConfigError
from mailer.smtp.pipelining import Link


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """A verifying client context trusting the system store plus ``MAILER_SMTP_CA_FILE``.

    None without a CA file: aiosmtplib then builds its own default (system store) context.
    """
    if not ca_file:
        return None
    context = ssl.create_default_context()
    try:
        # Added to the system store, not instead of it: a relay may move to a public CA.
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigError(f"MAILER_SMTP_CA_FILE {ca_file!r} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"MAILER_SMTP_CA_FILE {ca_file!r} holds no readable PEM certificate "
            f"({getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__})"
        ) from None
    return context


@dataclass
class PooledConnection:
    """One open session to the relay, with what the pool needs to decide on reusing it."""

    smtp: aiosmtplib.SMTP
    generation: int
    opened_at: float
    last_used: float
    transactions: int = 0
    #: Set when the server offered PIPELINING: the connection is then ours, not aiosmtplib's.
    link: Link | None = None

    @property
    def is_connected(self) -> bool:
        """Open and in step with the server."""
        return self.link.usable if self.link is not None else self.smtp.is_connected

    async def rset(self) -> None:
        """RSET; raises on anything but 250."""
        if self.link is not None:
            await self.link.rset()
        else:
            await self.smtp.rset()

    async def noop(self) -> None:
        """NOOP; raises on anything but 250."""
        if self.link is not None:
            await self.link.noop()
        else:
            await self.smtp.noop()

    async def quit(self, timeout: float) -> None:
        """QUIT and close, waiting at most ``timeout`` for the reply."""
        if self.link is not None:
            async with asyncio.timeout(timeout):
                await self.link.quit()
        else:
            await self.smtp.quit(timeout=timeout)

    def close(self) -> None:
        """Drop the connection at once."""
        if self.link is not None:
            self.link.close()
        else:
            self.smtp.close()
