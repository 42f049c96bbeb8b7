"""What an SMTP attempt means for the message: pure reply classification, no I/O.

The transport (:mod:`mailer.smtp.pool`) reports every attempt as a :class:`SendResult`;
this module decides what a reply code and text mean: sent, retry later, permanent
refusal, unknown, and whether the refusal blames *us* (the client) rather than the
recipient (SPEC section 5, "A relay that refuses us").
"""

from __future__ import annotations

import enum
import re
import ssl
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Protocol

import aiosmtplib

from suppression.addresses import DOT_ATOM

#: Reply text kept in a :class:`SendResult` (it is stored with the message row).
MAX_RESPONSE_CHARS = 500

# RFC 3463 section 2 / RFC 2034 section 4: "class.subject.detail" leads the reply text.
_ENHANCED_CODE = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
# Characters that end or smuggle an SMTP command argument (RFC 5321 section 4.1.2).
_FORBIDDEN_IN_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")
# A dot-atom local part at a domain of letters, digits and hyphens: parseaddr gives such
# an address back unchanged, which the tests check on generated ones, so it skips
# parseaddr (about 12 us a call).
_PLAIN_ADDRESS = re.compile(rf"{DOT_ATOM}@(?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+")
# RFC 3463 section 3.2: X.1.7 and X.1.8 are about the *sender's* address, never the recipient.
_SENDER_ADDRESS_STATUSES = frozenset({"1.7", "1.8"})

#: RFC 4954 section 6 and RFC 3207 section 4: 530 authentication (or STARTTLS) required,
#: 534 mechanism too weak, 535 credentials invalid, 538 encryption required for the
#: mechanism. Each is about our session, whatever command it answers.
CLIENT_BLAME_CODES = frozenset({530, 534, 535, 538})
#: RFC 3463 / RFC 4954: 5.7.0 "authentication required" (Postfix also uses it for "Must
#: issue a STARTTLS command first") and 5.7.8 "credentials invalid"; they blame the client
#: when they answer AUTH or MAIL (at RCPT, 5.7.x is usually the recipient's own policy).
CLIENT_BLAME_STATUSES = frozenset({"5.7.0", "5.7.8", "5.7.9", "5.7.11"})
# Texts relays use for "you may not relay", "say who you are", "use TLS first".
_CLIENT_BLAME_TEXT = re.compile(
    r"relay(?:ing)?\s+(?:access\s+)?(?:denied|not\s+permitted|prohibited)"
    r"|not\s+permitted\s+to\s+relay|unable\s+to\s+relay|we\s+do\s+not\s+relay"
    r"|\b[he]?helo\s+command\s+rejected|\bbad\s+[he]?helo\b|\binvalid\s+[he]?helo\b"
    r"|must\s+issue\s+a\s+starttls|starttls\s+(?:is\s+)?required|tls\s+(?:is\s+)?required"
    r"|encryption\s+required|authentication\s+required",
    re.IGNORECASE,
)
# Addresses in a reply text ("<rcpt@example.org>: Relay access denied") never reach a log.
_ADDRESS_IN_TEXT = re.compile(r"<[^<>\s]*>|[^\s<>@]+@[^\s<>@]+")


class Outcome(enum.StrEnum):
    """What one SMTP attempt means for the message."""

    SENT = "sent"
    #: Safe to retry: a 4xx reply, a relay that refused *us*, or an attempt that died
    #: before the message data went out.
    DEFERRED = "deferred"
    #: A 5xx reply at MAIL, RCPT or DATA about the message (or an envelope that can never
    #: be sent).
    FAILED = "failed"
    #: Lost during or after DATA: the server may have accepted it (RFC 5321 section 6.1).
    UNKNOWN = "unknown"


class Stage(enum.StrEnum):
    """The protocol step at which an attempt ended."""

    ENVELOPE = "envelope"
    #: Held back by our own sending pace before any connection (SPEC 5, "Sending pace").
    PACE = "pace"
    CONNECT = "connect"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class EnvelopeLike(Protocol):
    """What the transport needs of a message: SMTP envelope plus the serialised bytes."""

    @property
    def sender(self) -> str: ...

    @property
    def recipients(self) -> tuple[str, ...]: ...

    @property
    def data(self) -> bytes: ...


@dataclass(frozen=True)
class SendResult:
    """The outcome of one attempt, with the server's reply code and text when there was one."""

    outcome: Outcome
    code: int | None
    response: str
    #: Where the attempt ended; None when it got through DATA.
    stage: Stage | None = None
    #: Recipients refused at RCPT while others were accepted (or all refused), each with
    #: its own result. Kept out of repr so a logged result never carries addresses.
    refused: tuple[tuple[str, SendResult], ...] = field(default=(), repr=False)
    #: The relay refused *us* (credentials, EHLO name, TLS, relaying): not the
    #: recipient's fault, so deferred, never failed or suppressed (SPEC 5).
    relay_error: bool = False
    #: Seconds the sending pace asks this domain's mail to wait, when it asked.
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if len(self.response) > MAX_RESPONSE_CHARS:
            object.__setattr__(self, "response", self.response[:MAX_RESPONSE_CHARS])

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code (``5.1.1``) that leads the reply, if any."""
        match = _ENHANCED_CODE.match(self.response)
        return match.group(1) if match else None

    @property
    def is_user_unknown(self) -> bool:
        """True for a permanent 5.1.x bad-recipient reply, which suppresses the address."""
        # Only enhanced codes count: bare 550 is also used for spam and policy refusals,
        # and 5.7.x is policy, never an unknown user.
        enhanced = self.enhanced
        if self.outcome is not Outcome.FAILED or self.code is None or not 500 <= self.code < 600:
            return False
        if enhanced is None or not enhanced.startswith("5.1."):
            return False
        # A refused MAIL FROM is about our sender address, not the recipient.
        return self.stage is not Stage.MAIL and enhanced[2:] not in _SENDER_ADDRESS_STATUSES


def blames_client(code: int | None, text: str, stage: Stage | None) -> bool:
    """Whether a reply refuses the client (us) rather than the recipient (SPEC 5).

    Authentication required or failed (530/535, 5.7.0/5.7.8 at AUTH or MAIL), a rejected
    EHLO/HELO name (Postfix answers ``504 5.5.2 ... Helo command rejected`` at RCPT), TLS
    required, "Relay access denied" at MAIL or RCPT. Retrying after the operator fixes
    the configuration delivers the message; failing it would blame the recipient.
    """
    if code is None or not 400 <= code < 600:
        return False
    if stage is Stage.CONNECT:
        # Refusals of EHLO, STARTTLS or AUTH (not a busy greeting: 421 is load, not us).
        return code != 421
    if stage not in (Stage.MAIL, Stage.RCPT):
        return False  # after DATA a refusal is about the message itself
    if code in CLIENT_BLAME_CODES:
        return True
    match = _ENHANCED_CODE.match(text)
    if match and match.group(1) in CLIENT_BLAME_STATUSES and stage is Stage.MAIL:
        return True
    return _CLIENT_BLAME_TEXT.search(text) is not None


def reply(code: int, message: str, stage: Stage) -> SendResult:
    """The result of a 4xx/5xx reply at ``stage``."""
    if blames_client(code, message, stage):
        return SendResult(Outcome.DEFERRED, code, message, stage, relay_error=True)
    # RFC 5321 section 4.2.1: 5yz is permanent, 4yz transient.
    outcome = Outcome.FAILED if 500 <= code < 600 else Outcome.DEFERRED
    return SendResult(outcome, code, message, stage)


def local_failure(exc: BaseException, stage: Stage, outcome: Outcome) -> SendResult:
    """The result of a failure without a usable reply (lost, timed out, TLS)."""
    tls = _tls_problem(exc)
    if tls is not None:
        # A certificate we cannot verify, or no STARTTLS offered while we require it: the
        # relay setup is wrong, not the recipient (SPEC 5, TLS required).
        return SendResult(outcome, None, tls, stage, relay_error=True)
    return SendResult(outcome, None, describe(exc), stage)


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _tls_problem(exc: BaseException) -> str | None:
    """The TLS failure, with its reason (``certificate verify failed: ...``), if it is one."""
    for error in _chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            detail = error.verify_message or error.reason or "certificate verify failed"
            return f"TLS certificate not trusted: {detail}"
        if isinstance(error, ssl.SSLError):
            return f"TLS handshake failed: {error.reason or type(error).__name__}"
    if isinstance(exc, aiosmtplib.SMTPException) and "starttls" in exc.message.lower():
        return f"TLS required but not available: {exc.message}"
    return None


def describe(exc: BaseException) -> str:
    """A short, address-free description of a local (non-reply) failure."""
    chain = _chain(exc)
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    tls = _tls_problem(exc)
    if tls is not None:
        return tls
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        return "timed out connecting"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server"
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError):
        return "connection lost"
    if isinstance(exc, aiosmtplib.SMTPException):
        return exc.message
    return type(exc).__name__


def redacted(text: str) -> str:
    """A reply text with every address replaced, fit for a log line."""
    return _ADDRESS_IN_TEXT.sub("<address>", text)


def _address_problem(address: str, *, may_be_empty: bool) -> str | None:
    if address == "":
        return None if may_be_empty else "empty recipient address"
    if not address.isascii():
        # SPEC section 6: addresses go out in ASCII form; we never negotiate SMTPUTF8.
        return "address is not ASCII"
    # aiosmtplib quotes through parseaddr, which silently truncates odd input instead of
    # rejecting it; refuse anything it would rewrite so the envelope is exactly as given.
    if _PLAIN_ADDRESS.fullmatch(address):
        return None
    if _FORBIDDEN_IN_ADDRESS.search(address) or parseaddr(address)[1] != address:
        return "address not allowed on an SMTP command line"
    return None


def envelope_problem(envelope: EnvelopeLike) -> SendResult | None:
    """A failed result when the envelope can never be sent, else None."""
    if not envelope.recipients:
        return SendResult(Outcome.FAILED, None, "no recipients", Stage.ENVELOPE)
    problems = [_address_problem(envelope.sender, may_be_empty=True)]
    problems += [_address_problem(r, may_be_empty=False) for r in envelope.recipients]
    for problem in problems:
        if problem is not None:
            return SendResult(Outcome.FAILED, None, problem, Stage.ENVELOPE)
    return None


def all_refused(refused: list[tuple[str, SendResult]]) -> SendResult:
    """Summarise an attempt where no recipient was accepted."""
    # If any refusal was temporary, retrying may still reach that recipient.
    for _, result in refused:
        if result.outcome is Outcome.DEFERRED:
            break
    else:
        result = refused[0][1]
    return SendResult(result.outcome, result.code, result.response, Stage.RCPT, tuple(refused),
                      relay_error=result.relay_error)
