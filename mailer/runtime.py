"""The adapters one process works with, wired once from :class:`Settings`."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from types import FrameType

from redis import Redis
from sqlalchemy import Engine

from mailer.config import Settings
from mailer.keys import KeyUsage
from mailer.mail.headers import parse_sender
from mailer.mail.stored import StoredTemplates
from mailer.mail.templates import Catalogue
from mailer.preferences.tokens import TokenSigner
from mailer.sending.queue import BrokerEnqueuer, Enqueuer
from mailer.store.db import make_engine
from mailer.store.recipients import Address
from mailer.times import utcnow
from suppression.addresses import address_hash, normalise

__all__ = ["Runtime", "utcnow"]


@dataclass
class Runtime:
    """Settings plus the database, templates, token signer and queue of one process.

    Every entry point (API, worker, scheduler, CLI) builds one, and this is the one place
    that wires the pieces together: in particular the catalogue finds marketing templates
    stored through the API by name, like file templates (SPEC 7), in every process.
    """

    settings: Settings
    engine: Engine
    catalogue: Catalogue
    enqueuer: Enqueuer
    clock: Callable[[], datetime] = utcnow
    signer: TokenSigner = field(init=False)
    mail_domain: str = field(init=False)

    def __post_init__(self) -> None:
        self.signer = TokenSigner(self.settings.secret_key, self.settings.old_secret_keys)
        _, sender = parse_sender(self.settings.mail_from)
        self.mail_domain = sender.rpartition("@")[2] or "localhost"
        # Address hashes are lookup keys stored in every suppression: they must not change
        # when the signing key rotates, so they stay keyed by the oldest key in use.
        oldest = (*self.settings.old_secret_keys, self.settings.secret_key)[0]
        self._hash_key = oldest.encode()
        stored = self.catalogue.fallback
        if not (isinstance(stored, StoredTemplates) and stored.engine is self.engine):
            self.catalogue.fallback = StoredTemplates(self.engine)

    @classmethod
    def from_settings(cls, settings: Settings, enqueuer: Enqueuer | None = None, *,
                      pool_size: int | None = None) -> Runtime:
        """Connect the real adapters; ``pool_size`` caps the process's database connections."""
        return cls(
            settings=settings,
            engine=make_engine(settings.database_url, pool_size=pool_size),
            catalogue=Catalogue(settings.templates_dir),
            enqueuer=enqueuer if enqueuer is not None else BrokerEnqueuer(settings.broker_url),
        )

    @cached_property
    def redis(self) -> Redis[bytes]:
        """A client of ``MAILER_REDIS_URL`` for what every process shares (key use, metrics).

        It connects on its first command; short timeouts, because nothing it holds is worth
        holding up a request for.
        """
        client: Redis[bytes] = Redis.from_url(self.settings.redis_url, socket_timeout=2,
                                              socket_connect_timeout=2)
        return client

    @cached_property
    def key_usage(self) -> KeyUsage:
        """Last-use times of API keys (``GET /v1/keys``), recorded at most once a minute."""
        return KeyUsage(self.redis)

    def address(self, raw: str) -> Address:
        """Validate and normalise an address; raises ``InvalidAddressError``."""
        email = normalise(raw)
        return Address(email=email, hash=self.hash_email(email))

    def hash_email(self, normalised: str) -> str:
        """The keyed hash under which suppressions and history are matched (SPEC 4)."""
        return address_hash(normalised, self._hash_key)

    def new_message_id(self) -> tuple[str, str]:
        """A row id and a separate unguessable RFC 5322 Message-ID, fixed at acceptance."""
        return new_message_ids(self.mail_domain)[0]

    def new_message_ids(self, count: int) -> list[tuple[str, str]]:
        """``count`` of :meth:`new_message_id`'s pairs, for a batch of rows."""
        return new_message_ids(self.mail_domain, count)

    def url(self, path: str) -> str:
        """An absolute link to one of our public pages."""
        return f"{self.settings.public_url}{path}"


def new_message_ids(mail_domain: str, count: int = 1) -> list[tuple[str, str]]:
    """``count`` pairs of a row id (32 hex digits) and a Message-ID, led by the time in ms.

    The rest is random: 80 bits in the id, 128 in the Message-ID, which stays unguessable.
    Rows written together then sit side by side in the primary-key and Message-ID indexes
    instead of on random pages; with fully random ids, every insert into a table of
    millions of rows touches pages of those indexes that are no longer cached. The random
    bits of a batch come from one read of the system's CSPRNG (the source of ``secrets``):
    two reads per message were a twentieth of a campaign fan-out's CPU.
    """
    stamp = f"{time.time_ns() // 1_000_000:012x}"
    pool = os.urandom(26 * count).hex()
    return [(stamp + pool[i:i + 20], f"<{stamp}{pool[i + 20:i + 52]}@{mail_domain}>")
            for i in range(0, 52 * count, 52)]


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """An event that SIGTERM and SIGINT set, for a long-running process's main loop.

    Signal handlers can only be installed from the main thread; elsewhere (a test that runs
    the loop in a thread and sets the event itself) the event is returned as it is.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def _stop(signum: int, frame: FrameType | None) -> None:
            stop.set()
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    return stop
