"""Find and check email addresses in report text: typed DSN fields and free prose."""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Local parts that name a mail system, never a person we mailed (RFC 5321 section 4.5.1).
DAEMON_LOCAL_PARTS = frozenset(
    {
        "mailer-daemon",
        "mailer_daemon",
        "mailerdaemon",
        "mail-daemon",
        "maildaemon",
        "postmaster",
        "double-bounce",
    }
)

# An address in prose: a dot-atom-ish local part (not starting with a quote or a dot, so
# 'quoted' and <angled> forms lose their punctuation) and a domain of labels with a
# letter TLD or an xn-- label, or a bracketed IP literal. Bounded lengths keep it linear.
_LOCAL = r"[\w!#$%&*+/=?^`{|}~-][\w!#$%&'*+/=?^`{|}~.-]{0,63}"
_LABEL = r"[^\W_](?:[\w-]{0,61}[^\W_])?"
_DOMAIN = rf"(?:(?:{_LABEL}\.){{1,10}}(?:[^\W\d_]{{2,63}}|xn--[\w-]{{1,59}})|\[[0-9.]{{7,15}}\])"
ADDRESS = re.compile(rf"(?<![\w!#$%&*+/=?^`{{|}}~.@-])({_LOCAL})@({_DOMAIN})(?![\w-]|\.[^\W_])")

_X400_PREFIX = re.compile(r"^(?:smtp|rfc-?822)=", re.I)
# RFC 6533 section 3: a "utf-8" typed address may escape characters as \x{HEX}.
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
# A typed DSN address field: "rfc822; user@example.org" (the type is optional in the wild).
_TYPED = re.compile(r"^\s*(?:([A-Za-z0-9][\w.+-]{0,30})\s*;)?\s*(.*?)\s*$", re.S)


def find(text: str) -> list[str]:
    """Return every well-formed address in ``text``, in order of appearance."""
    found = []
    for match in ADDRESS.finditer(text):
        # X.400 gateways write "dda:SMTP=a@b" and "RFC822=a@b": the prefix is no local part.
        address = check(_X400_PREFIX.sub("", match.group(0)))
        if address is not None:
            found.append(address)
    return found


def check(value: str, *, dotless_domain: bool = False) -> str | None:
    """Return ``value`` as a bare address when it is well formed, else None.

    Strips angle brackets, quotes, a ``mailto:`` prefix and trailing punctuation; the
    case is kept (the caller normalises for suppression, SPEC section 4).
    """
    text = value.strip().strip("<>\"'`(){},;:").strip()
    if text.lower().startswith("mailto:"):
        text = text[7:].strip("<> ")
    text = text.rstrip(".,;:")
    if len(text) > 254 or text.count("@") != 1 or any(c.isspace() for c in text):
        return None
    local, domain = text.split("@")
    if not local or not domain or len(local) > 64:
        return None
    # A dot-atom has no leading, trailing or doubled dot; "david...@gmail.com" is how
    # list archives obfuscate addresses, not an address.
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    if any(c in local for c in '<>()[]\\,;:"@'):
        return None
    if domain.startswith("[") and domain.endswith("]"):
        return text
    labels = domain.split(".")
    if (len(labels) < 2 and not dotless_domain) or any(not label for label in labels):
        return None
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return None
    if not all(re.fullmatch(r"[\w-]{1,63}", label) for label in labels):
        return None
    return text


def typed(value: str | None) -> tuple[str | None, str | None]:
    """Split a typed DSN/ARF address field into ``(type, address)``, either may be None.

    The type is lower-cased; a field without ``type;`` has type None. RFC 6533 ``utf-8``
    escapes are decoded.
    """
    if not value:
        return None, None
    match = _TYPED.match(value)
    if match is None:
        return None, None
    kind = match.group(1).lower() if match.group(1) else None
    rest = match.group(2)
    if kind == "utf-8":
        rest = _UTF8_ESCAPE.sub(_unescape, rest)
    # Some MTAs add a display name or a comment: keep the first address inside.
    address = check(rest, dotless_domain=True)
    if address is None:
        inner = find(rest)
        address = inner[0] if inner else None
    return kind, address


def is_daemon(address: str) -> bool:
    """Tell whether ``address`` belongs to a mail system (MAILER-DAEMON, postmaster...)."""
    local = address.split("@", 1)[0].lower()
    return local in DAEMON_LOCAL_PARTS


def key(address: str) -> str:
    """Return the comparison key of an address (case-insensitive, as mailbox providers do)."""
    return address.lower()


def unique(addresses: Iterable[str]) -> list[str]:
    """Return ``addresses`` without repeats (case-insensitive), first spelling kept."""
    seen: dict[str, str] = {}
    for address in addresses:
        seen.setdefault(key(address), address)
    return list(seen.values())


def _unescape(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return match.group(0)
    return chr(code)
