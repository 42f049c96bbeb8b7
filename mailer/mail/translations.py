"""gettext catalogues for the words the system writes itself: the footer and the pages.

Templates' own text is translated by folders (``templates/<name>/<locale>/``); the footer of
promotions and the public pages are written once, in English, with jinja2's i18n tags
(``{% trans %}``), and translated by standard gettext ``.po`` files (SPEC 14: a language is
added by adding files, not code)::

    templates/_locales/<tag>/LC_MESSAGES/mailer.po

The ``.po`` files are read at start-up with Babel and compiled in memory, so there is no
build step and no ``.mo`` to keep in step. A deployment's own templates folder may hold
``_locales`` too: its messages win, and the shipped catalogue of the same language fills
in what it lacks.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from gettext import NullTranslations
from io import BytesIO
from pathlib import Path

from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations

from mailer.mail.locales import DEFAULT_LOCALE, choose, language_of, normalise

log = logging.getLogger(__name__)

#: The gettext domain: the file name of every catalogue.
DOMAIN = "mailer"
#: The templates folder shipped with the project (a deployment's own may replace parts).
SHIPPED_TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def _load_po(path: Path) -> Translations:
    """One ``.po`` file as gettext translations (fuzzy entries are not used)."""
    with path.open("rb") as fh:
        catalog = read_po(fh, domain=DOMAIN)
    compiled = BytesIO()
    write_mo(compiled, catalog, use_fuzzy=False)
    compiled.seek(0)
    return Translations(fp=compiled, domain=DOMAIN)


class MessageCatalogues:
    """The languages the footer and pages are available in, and their translations."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self._translations: dict[str, NullTranslations] = {}
        for root in reversed(_unique(roots)):  # shipped first, so a deployment's wins
            folder = root / "_locales"
            if not folder.is_dir():
                continue
            for child in sorted(folder.iterdir()):
                tag = normalise(child.name)
                po = child / "LC_MESSAGES" / f"{DOMAIN}.po"
                if tag is None or not po.is_file():
                    continue
                loaded = _load_po(po)
                earlier = self._translations.get(tag)
                if earlier is not None:
                    loaded.add_fallback(earlier)
                self._translations[tag] = loaded

    @property
    def languages(self) -> list[str]:
        """The tags that have a catalogue, sorted."""
        return sorted(self._translations)

    def language_for(self, wanted: str | None, default: str = DEFAULT_LOCALE) -> str:
        """The language to write in for someone who asked for ``wanted`` (SPEC 14's rule)."""
        return choose(self._translations, wanted, default).language

    def translations(self, language: str) -> NullTranslations:
        """gettext for ``language``; the English source text when there is no catalogue."""
        found = self._translations.get(normalise(language) or "")
        return found if found is not None else NullTranslations()


def _unique(roots: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        resolved = root.resolve()
        if resolved not in out:
            out.append(resolved)
    return out


@lru_cache(maxsize=8)
def catalogues_for(folder: Path) -> MessageCatalogues:
    """The catalogues of a templates folder, with the shipped ones filling in (cached)."""
    return MessageCatalogues([folder, SHIPPED_TEMPLATES])


def babel_locale(language: str) -> Locale:
    """Babel's locale data for a tag, falling back to its language, then to English."""
    for candidate in (language, language_of(language), DEFAULT_LOCALE):
        try:
            return Locale.parse(candidate, sep="-")
        except (UnknownLocaleError, ValueError):
            continue
    return Locale("en")


def date_formatter(language: str) -> Callable[[object], str]:
    """A function that writes a date (or ISO 8601 text) the way ``language`` reads it."""
    locale = babel_locale(language)

    def formatted(value: object) -> str:
        moment: dt.date
        if isinstance(value, dt.datetime | dt.date):
            moment = value
        elif isinstance(value, str):
            try:
                moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                return value  # not a date: shown as given rather than failing the mail
        else:
            return str(value)
        if isinstance(moment, dt.datetime):
            moment = moment.astimezone(dt.UTC).date() if moment.tzinfo else moment.date()
        return str(format_date(moment, format="long", locale=locale))

    return formatted
