"""Marketing templates stored through the API: checked on save, cached, rendered in bounds.

File templates are written by developers and reviewed like code; these come from anyone
holding a ``marketing`` key, so they are treated as untrusted input (SPEC 7: "rendered in
a sandbox"). Three layers:

1. The token stream is held to static bounds before jinja2 parses it, and
2. the syntax tree is checked against allow-lists and size bounds
   (both in :mod:`mailer.mail.checks`; a refusal is a 422).
3. Rendering runs in the sandbox of :mod:`mailer.mail.sandbox`, with the allowed filters only
   and a budget per render (iterations, the size of every value built, output and time).
   A template that exceeds it fails that one message.

Translations (SPEC 14, ``translations: {"de": {subject, html, text?}}``) pass the same
three layers, each version with its own static bounds, and may read no variable the
default version does not (acceptance checks the data against one version).

The catalogue finds them by name through :class:`StoredTemplates`, which the
:class:`~mailer.runtime.Runtime` wires in.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from jinja2 import TemplateError as JinjaError
from jinja2.exceptions import SecurityError
from sqlalchemy import Connection, Engine, Row, insert, select, update

from mailer.errors import TemplateError, ValidationFailed
from mailer.mail.checks import Tally, check_part
from mailer.mail.locales import normalise
from mailer.mail.sandbox import render_part, start_render
from mailer.mail.templates import Rendered, Template
from mailer.mail.text import html_to_text
from mailer.store.schema import marketing_templates
from suppression.policy import Category

#: How long a worker trusts its cached copy before asking the database for a newer one.
CACHE_SECONDS = 2.0
#: Profile fields a campaign supplies for each recipient (SPEC 7).
PROFILE_VARIABLES = frozenset({"name", "email", "attributes"})
#: Most translations one stored template may hold (each is checked and compiled).
MAX_TRANSLATIONS = 30

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")


class StoredTemplate(Template):
    """A marketing template from the database, compiled in the bounded sandbox."""

    def __init__(self, name: str, topic: str, subject: str, html: str, text: str | None,
                 version: int = 0,
                 translations: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        # Template.__init__ is not called on purpose: it compiles in the file templates'
        # environment, which has neither the allow-lists nor the render budget.
        self.name = name
        self.category = Category.PROMOTION
        self.topic = topic
        self.required = ()
        self.description = ""
        self.version = version
        self._sources = (subject, html, text)  # for Template.render_reused
        tally = Tally()
        self._parts = (check_part("subject", subject, tally), check_part("html", html, tally),
                       check_part("text", text, tally) if text is not None else None)
        self.variables = frozenset().union(*(p.variables for p in self._parts if p))
        self.translations = {}
        for tag, sources in _translation_sources(translations).items():
            try:
                translated = StoredTemplate(name, topic, sources["subject"], sources["html"],
                                            sources.get("text"), version)
            except ValidationFailed as exc:
                # Say which version is refused: the problems alone do not.
                exc.details = {"locale": tag, **(exc.details if isinstance(exc.details, dict)
                                                 else {"problems": exc.details})}
                raise
            extra = translated.variables - self.variables
            if extra:
                raise ValidationFailed(
                    f"the {tag} translation reads variables the default version does not: "
                    f"{', '.join(sorted(extra))}",
                    details={"locale": tag, "variables": sorted(extra)},
                    code="translation_variables")
            self.translations[tag] = translated

    def render(self, data: Mapping[str, Any], *, derive_text: bool = True,
               language: str | None = None) -> Rendered:
        """Render all parts within the budget; :class:`TemplateError` when it is exceeded."""
        subject_part, html_part, text_part = self._parts
        start_render()
        try:
            subject, spent = render_part(subject_part.template, data, 0)
            html, spent = render_part(html_part.template, data, spent)
            if text_part is not None:
                text, spent = render_part(text_part.template, data, spent)
            else:
                text = html_to_text(html) if derive_text else ""
        except SecurityError as exc:
            raise TemplateError(f"template {self.name!r} exceeded its limits: {exc}",
                                code="template_limit") from None
        except JinjaError as exc:
            raise TemplateError(
                f"template {self.name!r} could not be rendered: {exc.message or exc}",
                code="missing_variable" if "undefined" in str(exc) else "template_error",
            ) from None
        return Rendered(subject=subject, html=html, text=text)


def _translation_sources(raw: Mapping[str, Mapping[str, Any]] | None
                         ) -> dict[str, Mapping[str, Any]]:
    """Translations keyed by canonical tag; 422 for a bad tag, a duplicate or a bad shape."""
    if not raw:
        return {}
    if len(raw) > MAX_TRANSLATIONS:
        raise ValidationFailed(f"at most {MAX_TRANSLATIONS} translations",
                               code="invalid_translations")
    out: dict[str, Mapping[str, Any]] = {}
    for key, sources in raw.items():
        tag = normalise(key)
        if tag is None:
            raise ValidationFailed(f"{key[:40]!r} is not a language tag (write it like de or "
                                   "pt-BR)", details={"locale": key[:40]}, code="invalid_locale")
        if tag in out:
            raise ValidationFailed(f"two translations for {tag}", details={"locale": tag},
                                   code="invalid_translations")
        if not isinstance(sources, Mapping) or not isinstance(sources.get("subject"), str) \
                or not isinstance(sources.get("html"), str) \
                or not isinstance(sources.get("text", ""), str | None) \
                or set(sources) - {"subject", "html", "text"}:
            raise ValidationFailed(f"the {tag} translation needs subject and html (and may "
                                   "have text), all strings", details={"locale": tag},
                                   code="invalid_translations")
        out[tag] = sources
    return out


def translation_sources(raw: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """Translations as stored: canonical tags, the sources only."""
    return {tag: {"subject": s["subject"], "html": s["html"], "text": s.get("text")}
            for tag, s in _translation_sources(raw).items()}


def from_row(row: Row[Any]) -> StoredTemplate:
    """The compiled template of a ``marketing_templates`` row."""
    return StoredTemplate(row.name, row.topic, row.subject, row.html, row.text, row.version,
                          row.translations)


def validate_name(name: str) -> None:
    """Names are lower-case letters, digits, ``-`` and ``_`` (they appear in URLs and logs)."""
    if not _NAME.match(name):
        raise ValidationFailed("template names use a-z, 0-9, - and _ (at most 100)",
                               code="invalid_name")


def load(conn: Connection, name: str) -> Row[Any] | None:
    """The stored row, if any."""
    return conn.execute(select(marketing_templates).where(marketing_templates.c.name == name)
                        ).first()


def save(conn: Connection, name: str, template: StoredTemplate, sources: Mapping[str, Any],
         api_key_id: int | None, now: datetime) -> tuple[Row[Any], bool]:
    """Insert or replace a checked template; return the row and whether it was created."""
    values = {
        "category": Category.PROMOTION.value, "topic": template.topic,
        "subject": sources["subject"], "html": sources["html"], "text": sources.get("text"),
        "variables": sorted(template.variables), "api_key_id": api_key_id, "updated_at": now,
        "translations": translation_sources(sources.get("translations")) or None,
    }
    existing = load(conn, name)
    if existing is None:
        conn.execute(insert(marketing_templates).values(name=name, version=1, created_at=now,
                                                        **values))
    else:
        conn.execute(update(marketing_templates).where(marketing_templates.c.name == name)
                     .values(version=marketing_templates.c.version + 1, **values))
    row = load(conn, name)
    assert row is not None
    return row, existing is None


class StoredTemplates:
    """The catalogue's fallback: stored templates by name, cached for a few seconds."""

    def __init__(self, engine: Engine, ttl: float = CACHE_SECONDS) -> None:
        self.engine = engine
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, StoredTemplate | None]] = {}

    def __call__(self, name: str) -> Template | None:
        """The compiled template, or None when no such name is stored."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        with self.engine.connect() as conn:
            row = load(conn, name)
        found: StoredTemplate | None = None
        if row is not None:
            old = cached[1] if cached is not None else None
            # Recompile only when the stored version changed.
            found = old if old is not None and old.version == row.version else from_row(row)
        with self._lock:
            self._cache[name] = (now, found)
        return found

