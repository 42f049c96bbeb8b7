"""Address normalisation and the keyed hash that suppression entries are looked up by."""

from __future__ import annotations

import hashlib
import hmac
import re
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

#: RFC 5321 section 4.5.3.1.3: a path is at most 256 octets, angle brackets included.
MAX_ADDRESS_LENGTH = 254
#: RFC 5321 section 4.5.3.1.1: a local part is at most 64 octets.
MAX_LOCAL_PART_LENGTH = 64


#: An ASCII dot-atom (RFC 5322 section 3.2.3: atext runs with single dots between them), as
#: regular-expression text: the plain local part both checks here and SMTP's envelope
#: check (mailer.smtp.replies) take a shortcut for.
DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_DOT_ATOM = re.compile(DOT_ATOM)
#: Domains whose verdict is remembered per process (most mail goes to a few domains).
_DOMAINS_REMEMBERED = 4096


class InvalidAddressError(ValueError):
    """Raised when an address cannot be used as a recipient; the message never echoes it."""


def normalise(address: str, *, test_environment: bool = False) -> str:
    """Return ``local@ascii-domain`` for a valid address, or raise :class:`InvalidAddressError`.

    The domain is lower-cased and converted to its IDNA A-label (punycode) form; the local
    part is kept as typed, because RFC 5321 section 2.4 lets the receiving host treat it as
    case-sensitive. ``test_environment`` admits the special-use ``.test`` names (RFC 6761)
    that a development sink may use; it is never on in production.
    """
    if not isinstance(address, str):
        raise InvalidAddressError("an email address must be a string")
    if len(address) > MAX_ADDRESS_LENGTH:
        # Checked before any parsing, so an oversized input costs nothing to refuse.
        raise InvalidAddressError(f"an email address is at most {MAX_ADDRESS_LENGTH} characters")
    if "@" not in address:
        raise InvalidAddressError("an email address must contain an @-sign")
    if "=?" in address:
        # RFC 2047 section 5: an encoded-word MUST NOT appear in any portion of an
        # addr-spec. "=?" is legal atext, but a mail client that decodes it anyway would
        # show (or reply to) something other than what we validated.
        raise InvalidAddressError("an email address may not contain an RFC 2047 encoded-word")
    local, _, domain = address.rpartition("@")
    if len(local) <= MAX_LOCAL_PART_LENGTH and _DOT_ATOM.fullmatch(local):
        # email-validator judges such a local part on its own, and the domain on its own:
        # the domain's verdict (about 14 of its 24 us, in IDNA checks) is remembered.
        # Tests compare this path with the full one on generated addresses.
        ascii_domain = _domain(domain, test_environment)
        if ascii_domain is not None and len(local) + 1 + len(ascii_domain) <= MAX_ADDRESS_LENGTH:
            return f"{local}@{ascii_domain}"
    return _validated(address, local, test_environment)


@lru_cache(maxsize=_DOMAINS_REMEMBERED)
def _domain(domain: str, test_environment: bool) -> str | None:
    """The ASCII form of ``domain`` if an address at it can be valid, else None."""
    try:
        return _validated(f"a@{domain}", "a", test_environment).rpartition("@")[2]
    except InvalidAddressError:
        return None


def _validated(address: str, local: str, test_environment: bool) -> str:
    """:func:`normalise` by email-validator, once the cheap checks have passed."""
    if not local.isascii():
        # We send ASCII-only envelopes: a non-ASCII local part needs SMTPUTF8 (RFC 6531)
        # end to end and, unlike a domain, has no ASCII form to fall back on.
        raise InvalidAddressError(
            "internationalised characters before the @-sign are not supported"
        )
    try:
        # Every option is spelled out so that a module-level default changed elsewhere
        # (email_validator.ALLOW_QUOTED_LOCAL and friends) cannot loosen this check.
        validated = validate_email(
            address,
            check_deliverability=False,  # no DNS: decisions must not depend on the network
            allow_smtputf8=False,
            allow_empty_local=False,
            allow_quoted_local=False,  # quoted strings hide '@', spaces and CRLF from parsers
            allow_domain_literal=False,
            allow_display_name=False,
            strict=True,  # enforce the 64-octet local part of RFC 5321 section 4.5.3.1.1
            test_environment=test_environment,
        )
    except EmailNotValidError:
        # email-validator's own messages quote characters of the input; ours stay generic
        # so that no part of an address ever reaches a log line or an error body.
        raise InvalidAddressError("not a valid email address") from None
    ascii_domain: str | None = validated.ascii_domain
    if validated.smtputf8 or not ascii_domain:
        raise InvalidAddressError(
            "internationalised characters before the @-sign are not supported"
        )
    normalised = f"{validated.local_part}@{ascii_domain}"
    # The limits hold for the form we send: a punycode domain is longer than its U-label.
    if len(validated.local_part) > MAX_LOCAL_PART_LENGTH or len(normalised) > MAX_ADDRESS_LENGTH:
        raise InvalidAddressError("the address is too long for SMTP")
    return normalised


def address_hash(normalised: str, key: bytes) -> str:
    """Return the HMAC-SHA256 hex digest of a normalised address, compared case-insensitively.

    Lookups fold the local part's case too, since mailbox providers almost all treat
    ``Foo@x`` and ``foo@x`` as one person, and an erased person (SPEC section 3) must stay
    suppressed however the address is typed next time.
    """
    if not key:
        # Without a secret the hash of a known address is trivially recomputed.
        raise ValueError("an address hash needs a non-empty key")
    return hmac.new(key, normalised.lower().encode("utf-8"), hashlib.sha256).hexdigest()
