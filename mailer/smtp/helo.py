"""The name the SMTP client gives in EHLO/HELO (SPEC section 6).

RFC 5321 section 4.1.1.1: the EHLO argument is the client's fully qualified domain name
(or an address literal). Relays enforce it: Postfix's ``reject_non_fqdn_helo_hostname``
refuses ``EHLO localhost`` with 504 5.5.2, reported at RCPT, which would make every
message look refused. So the default is the machine's FQDN when that is a real one,
else the domain of ``MAILER_FROM``, which is ours and fully qualified; never localhost.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from email.utils import parseaddr

from mailer.errors import ConfigError

# RFC 1123 section 2.1 host name labels (letters, digits, hyphens; not at either end).
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE)


class HeloNameError(ConfigError, ValueError):
    """Raised when no fully qualified EHLO name can be found or the configured one is bad."""


def is_public_fqdn(name: str) -> bool:
    """Whether ``name`` is a fully qualified host name fit for EHLO (not a loopback name)."""
    name = name.rstrip(".").lower()
    if len(name) > 253 or "." not in name:
        return False
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return False  # a bare IP is not a name; RFC 5321 wants an address literal [1.2.3.4]
    # "localhost" (and, RFC 6761 section 6.3, anything under it) and Debian's
    # "localhost.localdomain"-style names mean this machine to everyone: never ours alone.
    if labels[0] in ("localhost", "localhost6") or labels[-1] == "localhost":
        return False
    return labels[-1] not in ("localdomain", "localdomain6")


def _from_domain(from_address: str) -> str:
    """The ASCII domain of ``MAILER_FROM`` (``Name <local@domain>`` or a bare address)."""
    _, address = parseaddr(from_address)
    _, at, domain = address.rpartition("@")
    domain = domain.strip().rstrip(".")
    if not at or not domain:
        return ""
    try:
        # EHLO is ASCII-only (RFC 5321 section 2.3.5): an internationalised domain goes
        # out in its A-label (punycode) form.
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return ""


def default_helo_name(fqdn: str, from_address: str) -> str:
    """The EHLO name: ``fqdn`` when it is a real FQDN, else the domain of ``from_address``."""
    if is_public_fqdn(fqdn):
        return fqdn.rstrip(".").lower()
    domain = _from_domain(from_address)
    if is_public_fqdn(domain):
        return domain
    raise HeloNameError(
        f"no fully qualified EHLO name: the machine is {fqdn!r} and MAILER_FROM has no "
        "usable domain; set MAILER_SMTP_HELO_NAME"
    )


def helo_name(
    configured: str | None,
    from_address: str,
    getfqdn: Callable[[], str] = socket.getfqdn,
) -> str:
    """``MAILER_SMTP_HELO_NAME`` if set (checked), else the default for this machine."""
    if configured is not None and configured.strip():
        name = configured.strip()
        if not is_public_fqdn(name) and not _is_address_literal(name):
            raise HeloNameError(
                f"MAILER_SMTP_HELO_NAME must be a fully qualified host name, got {name!r}"
            )
        return name
    return default_helo_name(getfqdn(), from_address)


def _is_address_literal(name: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``, RFC 5321 section 4.1.3."""
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
        version = 6
    else:
        version = 4
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        return False
    return address.version == version and not address.is_loopback
