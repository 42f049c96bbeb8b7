"""Which language version of a template, a footer or a page a person gets (SPEC 14).

Pure: tags in, a tag out. The rule is the SPEC's, in this order:

1. the locale asked for: the message's ``locale`` field, else the recipient's;
2. a version whose tag is exactly that one (``de-AT``), compared case-insensitively
   (BCP 47 tags are case-insensitive, RFC 5646 section 2.1.1);
3. else a version for its language alone (``de-AT`` -> ``de``);
4. else the default version, whose language is ``MAILER_DEFAULT_LOCALE``.

A malformed tag (from a profile written before tags were checked) is treated as no tag
at all: the person gets the default version, never an error at send time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

#: The language of every default version unless ``MAILER_DEFAULT_LOCALE`` says otherwise.
DEFAULT_LOCALE = "en"
#: Longest tag accepted (RFC 5646 section 4.4.1 recommends room for at least 35).
MAX_TAG_LENGTH = 35

# RFC 5646 section 2.1, the subset that names languages: a 2-3 letter ISO 639 language,
# then subtags of 1-8 letters or digits. Private-use and grandfathered irregular tags are
# not languages a template can be written in, and the 5-8 letter registered languages
# (none exist) would make any folder name, such as ``images``, look like a translation.
_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*")

T = TypeVar("T")


def normalise(tag: str | None) -> str | None:
    """The canonical spelling of a BCP 47 tag (``de_at`` -> ``de-AT``), or None if it is not one.

    RFC 5646 section 2.1.1's conventions: language lower case, a 4-letter script in
    title case, a 2-letter region upper case, everything else lower case. ``_`` is read
    as ``-`` because POSIX locale names (``de_AT``) are what many profiles hold.
    """
    if tag is None:
        return None
    text = tag.strip().replace("_", "-")
    if not text or len(text) > MAX_TAG_LENGTH or not _TAG.fullmatch(text):
        return None
    parts = text.split("-")
    out = [parts[0].lower()]
    for part in parts[1:]:
        if len(part) == 4 and part.isalpha():
            out.append(part.title())
        elif len(part) == 2 and part.isalpha():
            out.append(part.upper())
        else:
            out.append(part.lower())
    return "-".join(out)


def is_valid(tag: str) -> bool:
    """Whether ``tag`` is a well-formed language tag (for 422s on input)."""
    return normalise(tag) is not None


def language_of(tag: str) -> str:
    """The primary language subtag: ``de-AT`` -> ``de``."""
    return tag.split("-", 1)[0].lower()


def requested(message_locale: str | None, recipient_locale: str | None) -> str | None:
    """The locale asked for: the message's when it has a valid one, else the recipient's."""
    return normalise(message_locale) or normalise(recipient_locale)


@dataclass(frozen=True)
class Choice:
    """The version chosen: its key among the translations (None: the default version) and
    the language it is written in, for ``Content-Language`` and ``<html lang>``."""

    key: str | None
    language: str


def choose(available: Iterable[str], wanted: str | None, default: str = DEFAULT_LOCALE
           ) -> Choice:
    """Pick among the tags of the available translations: exact tag, its language, default.

    ``available`` need not be normalised; the returned key is the spelling it was given in.
    """
    default_tag = normalise(default) or DEFAULT_LOCALE
    target = normalise(wanted)
    if target is not None:
        by_tag: dict[str, str] = {}
        for key in available:
            canonical = normalise(key)
            if canonical is not None:
                by_tag.setdefault(canonical.lower(), key)
        for candidate in (target, language_of(target)):
            found = by_tag.get(candidate.lower())
            if found is not None:
                return Choice(found, normalise(found) or found)
    return Choice(None, default_tag)


def pick(translations: Mapping[str, T], wanted: str | None, default: str = DEFAULT_LOCALE
         ) -> tuple[T | None, str]:
    """The translation :func:`choose` selects from a mapping, or None for the default, and
    the language of the version chosen."""
    choice = choose(translations, wanted, default)
    return (translations[choice.key] if choice.key is not None else None), choice.language


def translated(base: str, translations: Mapping[str, Mapping[str, str]] | None, field: str,
               language: str) -> str:
    """``field`` of a topic in ``language`` (exact tag, then its language), else ``base``.

    Topics hold ``{"de": {"title": ..., "description": ...}}`` (SPEC 14); a translation
    that lacks the field, or is empty, leaves the default text.
    """
    found, _ = pick(dict(translations or {}), language)
    value = found.get(field) if found is not None else None
    return value if isinstance(value, str) and value else base
