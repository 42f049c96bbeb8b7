"""What one message to one address of the inbound domain does (SPEC 12).

Shared by the SMTP listener and the bounce-mailbox poller, so that a message has the same
effect whichever way it came:

- ``bounces+TOKEN@``: read and applied to exactly the message the token names;
- ``unsubscribe+TOKEN@``: the token's topic revoked with source ``mailto``, whatever the
  subject and body (RFC 8058 section 3.2), as a one-click POST does;
- ``fbl@``: a feedback-loop report, tied by our Message-ID or the VERP envelope sender of
  the original it quotes;
- ``postmaster@`` (RFC 5321 4.5.1): kept for a person to read, in a Maildir.

Every method has committed its effect (or stored the message durably) when it returns;
an exception means nothing was promised, and the caller answers 451 or leaves the message
where it was.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from mailer.inbound.addresses import InboundAddresses, Mailbox, Target
from mailer.preferences.self_service import SelfService
from mailer.reports.intake import ReportIntake
from mailer.runtime import Runtime
from mailer.store.schema import topics

log = logging.getLogger(__name__)

#: The ``source`` of reports that reached us as mail, in ``bounce_reports`` and /metrics.
SOURCE_BOUNCES = "inbound"
SOURCE_FBL = "fbl"
#: The ledger source of an unsubscribe by ``mailto:`` (SPEC 4).
MAILTO = "mailto"


@dataclass(frozen=True)
class Delivered:
    """What one message did for one mailbox, in words without addresses."""

    mailbox: str
    summary: str


class Maildir:
    """A Maildir (``tmp``/``new``/``cur``) that any mail client can open for a person."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def store(self, raw: bytes) -> Path:
        """Write ``raw`` durably: to ``tmp``, fsync, then rename into ``new``."""
        for sub in ("tmp", "new", "cur"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}.{uuid.uuid4().hex}.{socket.gethostname().replace('/', '_')}"
        tmp, final = self.root / "tmp" / name, self.root / "new" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        # The rename is durable only once the directory itself is synced.
        dir_fd = os.open(self.root / "new", os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final


class InboundDelivery:
    """Routes inbound mail for one runtime; the addresses need ``MAILER_INBOUND_DOMAIN``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        settings = rt.settings
        self.addresses: InboundAddresses | None = (
            InboundAddresses.from_keys(settings.inbound_domain, settings.secret_key,
                                       settings.old_secret_keys)
            if settings.inbound_domain else None
        )
        self.intake = ReportIntake(rt)
        self.postmaster = Maildir(settings.postmaster_dir)

    def target(self, address: str) -> Target | None:
        """The mailbox ``address`` names at our domain, or None (550 at RCPT)."""
        return self.addresses.read(address) if self.addresses is not None else None

    def is_ours(self, address: str) -> bool:
        """Whether ``address`` is at the inbound domain at all (else: no relaying)."""
        if self.addresses is None:
            return False
        domain = address.strip().strip("<>").rpartition("@")[2].rstrip(".").lower()
        return domain == self.addresses.domain or "@" not in address

    def deliver(self, target: Target, raw: bytes, *, source: str | None = None) -> Delivered:
        """Do what a message to ``target`` does; committed when this returns."""
        if target.mailbox is Mailbox.BOUNCES:
            taken = self.intake.take(raw, source=source or SOURCE_BOUNCES,
                                     verp_message_id=target.message_id)
            return Delivered(target.mailbox.value, taken.summary())
        if target.mailbox is Mailbox.UNSUBSCRIBE:
            return Delivered(target.mailbox.value, self._unsubscribe(target))
        if target.mailbox is Mailbox.FBL:
            taken = self.intake.take(raw, source=source or SOURCE_FBL)
            return Delivered(target.mailbox.value, taken.summary())
        self.postmaster.store(raw)
        return Delivered(target.mailbox.value, "stored")

    def deliver_unaddressed(self, raw: bytes, *, source: str) -> Delivered:
        """A message in a bounce mailbox that names none of our addresses (a plain
        ``MAILER_RETURN_PATH``): read as any report, tied as SPEC 4 says."""
        taken = self.intake.take(raw, source=source)
        return Delivered("report", taken.summary())

    def _unsubscribe(self, target: Target) -> str:
        assert self.addresses is not None and target.recipient_id is not None
        with self.rt.engine.connect() as conn:
            names = [r.name for r in conn.execute(select(topics.c.name))]
        topic = self.addresses.topic_for(target, names)
        service = SelfService(self.rt)
        if topic is None:
            # The topic is gone since the mail went out: the person wants less mail, and
            # guessing narrower would ignore that (as the /u/ link does).
            written = service.unsubscribe_all(target.recipient_id, MAILTO)
            return f"unsubscribed from all ({written} revokes)"
        changed = service.unsubscribe(target.recipient_id, topic, MAILTO)
        return "unsubscribed" if changed else "already unsubscribed"
