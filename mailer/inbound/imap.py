"""Poll a hosted bounce mailbox over IMAP (``MAILER_BOUNCE_IMAP_URL``, SPEC 12).

Each message is processed exactly as the SMTP listener would process it, by the address it
was delivered to (``Delivered-To``, ``X-Original-To``, ``Envelope-To``, then ``To`` and
``Cc``): ``bounces+TOKEN@``, ``unsubscribe+TOKEN@``, ``fbl@``, ``postmaster@``. A message
naming none of them (the mailbox is a plain ``MAILER_RETURN_PATH``) is read as any report
and tied to our mail as SPEC 4 says. Only after its effect is committed is a message moved
to ``<folder>.processed`` (or deleted with ``?delete=true``); one that fails stays where it
is and is tried again at the next poll. The standard library's imaplib, in the caller's
thread: polling is rare and one mailbox is read by one process.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import ssl
from collections import Counter
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from urllib.parse import parse_qs, unquote, urlsplit

from mailer.inbound.delivery import InboundDelivery
from mailer.runtime import Runtime

log = logging.getLogger("mailer.inbound.imap")

#: Messages handled per poll: a backlog drains over several polls in bounded steps.
MAX_PER_POLL = 500
#: Seconds an IMAP command may take before the poll gives up (the next poll retries).
TIMEOUT = 60.0
#: Header fields naming the address a message was delivered to, most reliable first.
ADDRESS_FIELDS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To", "Cc")
#: The ``source`` of reports read from the mailbox that name none of our addresses.
SOURCE_MAILBOX = "imap"
#: Largest message fetched (as the SMTP listener refuses larger ones).
MAX_MESSAGE = 10 * 1024 * 1024



@dataclass(frozen=True)
class MailboxUrl:
    """A parsed ``MAILER_BOUNCE_IMAP_URL``."""

    secure: bool
    host: str
    port: int
    username: str
    password: str
    folder: str
    delete: bool

    @classmethod
    def parse(cls, url: str) -> MailboxUrl:
        """Read ``imap(s)://user:pass@host[:port]/folder[?delete=true]``."""
        parts = urlsplit(url)
        secure = parts.scheme == "imaps"
        query = parse_qs(parts.query)
        return cls(
            secure=secure, host=parts.hostname or "",
            port=parts.port or (993 if secure else 143),
            username=unquote(parts.username or ""), password=unquote(parts.password or ""),
            folder=unquote(parts.path.lstrip("/")) or "INBOX",
            delete=(query.get("delete", ["false"])[0].lower() in ("1", "true", "yes")),
        )

    @property
    def processed(self) -> str:
        """Where handled messages go."""
        return f"{self.folder}.processed"


@dataclass
class PollReport:
    """What one pass found; counts and one line per message, without addresses."""

    seen: int = 0
    processed: int = 0
    failed: int = 0
    mailboxes: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)


def _quote(name: str) -> str:
    """An IMAP quoted string (RFC 3501 4.3) for a folder name."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BouncePoller:
    """One IMAP mailbox, polled on demand."""

    def __init__(self, rt: Runtime, url: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        configured = url or rt.settings.bounce_imap_url
        if not configured:
            raise ValueError("MAILER_BOUNCE_IMAP_URL is not set")
        self.url = MailboxUrl.parse(configured)
        self.delivery = InboundDelivery(rt)
        self.ssl_context = ssl_context

    def _connect(self) -> imaplib.IMAP4:
        if self.url.secure:
            context = self.ssl_context or ssl.create_default_context()
            return imaplib.IMAP4_SSL(self.url.host, self.url.port, ssl_context=context,
                                     timeout=TIMEOUT)
        return imaplib.IMAP4(self.url.host, self.url.port, timeout=TIMEOUT)

    def poll(self) -> PollReport:
        """Process every message in the folder (at most :data:`MAX_PER_POLL`)."""
        report = PollReport()
        imap = self._connect()
        try:
            imap.login(self.url.username, self.url.password)
            status, _ = imap.select(_quote(self.url.folder))
            if status != "OK":
                raise imaplib.IMAP4.error("cannot select the bounce folder")
            if not self.url.delete:
                # CREATE fails harmlessly when the folder exists already.
                imap.create(_quote(self.url.processed))
            status, data = imap.uid("SEARCH", "ALL")
            uids = (data[0] or b"").split() if status == "OK" and data else []
            for uid in uids[:MAX_PER_POLL]:
                report.seen += 1
                self._one(imap, uid.decode("ascii"), report)
            imap.expunge()
        finally:
            with contextlib.suppress(OSError, imaplib.IMAP4.error):
                imap.logout()
        return report

    def _one(self, imap: imaplib.IMAP4, uid: str, report: PollReport) -> None:
        status, data = imap.uid("FETCH", uid, "(BODY.PEEK[])")
        raw = next((item[1] for item in data or [] if isinstance(item, tuple)), None)
        if status != "OK" or not isinstance(raw, bytes):
            report.failed += 1
            report.lines.append(f"uid {uid}: could not be fetched")
            return
        try:
            done = self._deliver(raw[:MAX_MESSAGE])
        except Exception as exc:
            # Left in place: the next poll tries it again. No address in the log.
            report.failed += 1
            report.lines.append(f"uid {uid}: not processed ({type(exc).__name__})")
            log.warning("bounce mailbox message not processed: %s", type(exc).__name__)
            return
        if self.url.delete:
            imap.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
        else:
            status, _ = imap.uid("COPY", uid, _quote(self.url.processed))
            if status != "OK":
                # Its effect is committed and idempotent: processing it again later only
                # counts a duplicate. Never delete what could not be kept.
                report.failed += 1
                report.lines.append(f"uid {uid}: processed, but not moved")
                return
            imap.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
        report.processed += 1
        report.mailboxes[done[0]] += 1
        report.lines.append(f"uid {uid}: {done[0]}: {done[1]}")

    def _deliver(self, raw: bytes) -> tuple[str, str]:
        for address in self._addresses(raw):
            target = self.delivery.target(address)
            if target is not None:
                done = self.delivery.deliver(target, raw)
                return done.mailbox, done.summary
        done = self.delivery.deliver_unaddressed(raw, source=SOURCE_MAILBOX)
        return done.mailbox, done.summary

    @staticmethod
    def _addresses(raw: bytes) -> list[str]:
        """The addresses the message was delivered to, most reliable first."""
        end = raw.find(b"\r\n\r\n")
        head = raw[: end if end >= 0 else 64 * 1024]
        message = BytesHeaderParser(policy=compat32).parsebytes(head, headersonly=True)
        found: list[str] = []
        for name in ADDRESS_FIELDS:
            values = [str(v) for v in (message.get_all(name) or [])[:20]]
            found.extend(a for _, a in getaddresses(values) if a)
        return found
