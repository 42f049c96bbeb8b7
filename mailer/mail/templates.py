"""Message templates: loaded and compiled once, rendered strictly in jinja2's sandbox.

A template is its default version plus translations (SPEC 14): a file template's
``templates/<name>/<locale>/`` folders (``body.html``, optional ``body.txt``, optional
``template.toml`` with a ``subject``), or a stored template's ``translations``. Which one
a message gets is :mod:`mailer.mail.locales`' rule, applied by :meth:`Template.localised`.
"""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2 import Environment, StrictUndefined, meta, pass_context
from jinja2 import Template as JinjaTemplate
from jinja2 import TemplateError as JinjaError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailer.errors import TemplateError
from mailer.mail.locales import DEFAULT_LOCALE, normalise, pick
from mailer.mail.sandbox import DictSandbox
from mailer.mail.stencil import (
    Stencil,
    StencilCache,
    fixed_key,
    marker,
    plain_outputs,
    split_values,
)
from mailer.mail.text import html_to_text
from mailer.mail.translations import MessageCatalogues, catalogues_for, date_formatter
from suppression.policy import Category

#: Upper bound on rendered output, so a hostile template cannot fill memory or mailboxes.
MAX_RENDERED_CHARS = 2_000_000


@dataclass(frozen=True)
class Rendered:
    """A rendered message body and subject."""

    subject: str
    html: str
    text: str


#: The context name under which a render is told the language of the version rendered.
LANGUAGE_VARIABLE = "_language"


@pass_context
def _localised_date(context: Context, value: object) -> str:
    """``{{ effective_at | date }}``: a date written the way the version's language reads it."""
    return date_formatter(str(context.get(LANGUAGE_VARIABLE) or DEFAULT_LOCALE))(value)


def _environment(autoescape: bool) -> DictSandbox:
    # StrictUndefined: a missing variable is an error at accept time (422), never a
    # blank in a sent mail. The sandbox keeps templates away from Python internals.
    env = DictSandbox(
        autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=True
    )
    env.filters["date"] = _localised_date
    return env


_HTML_ENV = _environment(autoescape=True)
_TEXT_ENV = _environment(autoescape=False)


class Template:
    """A compiled template: subject, HTML and optional text part, and what it requires."""

    def __init__(
        self,
        name: str,
        category: Category,
        topic: str | None,
        subject: str,
        html: str,
        text: str | None = None,
        required: tuple[str, ...] = (),
        description: str = "",
        translations: Mapping[str, Template] | None = None,
    ) -> None:
        self.name = name
        self.category = category
        self.topic = topic
        self.required = required
        self.description = description
        #: Other language versions by canonical tag (SPEC 14); each renders the same data.
        self.translations: dict[str, Template] = dict(translations or {})
        self._sources = (subject, html, text)
        try:
            self._subject = _TEXT_ENV.from_string(subject)
            self._html = _HTML_ENV.from_string(html)
            self._text = _TEXT_ENV.from_string(text) if text is not None else None
        except JinjaError as exc:
            raise TemplateError(f"template {name!r} does not compile: {exc}") from None

    def missing(self, data: Mapping[str, Any]) -> list[str]:
        """The required variables absent from ``data``."""
        return [key for key in self.required if key not in data]

    def localised(self, wanted: str | None, default: str = DEFAULT_LOCALE
                  ) -> tuple[Template, str]:
        """The version for someone who asked for ``wanted``, and the language it is in."""
        found, language = pick(self.translations, wanted, default)
        return (found if found is not None else self), language

    def versions(self) -> list[Template]:
        """The default version and every translation."""
        return [self, *self.translations.values()]

    def render(self, data: Mapping[str, Any], *, derive_text: bool = True,
               language: str | None = None) -> Rendered:
        """Render all parts; raise :class:`TemplateError` for missing or broken variables.

        ``derive_text=False`` leaves the text part empty when the template has none:
        the accept-time check needs only to know that everything renders, and deriving
        text from HTML was 43 % of the API's CPU per message. ``language`` is the
        version's language, for the ``date`` filter.
        """
        self._check_present(data)
        return self._render(data, derive_text, language)

    def _check_present(self, data: Mapping[str, Any]) -> None:
        missing = self.missing(data)
        if missing:
            raise TemplateError(
                f"template {self.name!r} needs variables: {', '.join(missing)}",
                details={"missing": missing},
                code="missing_variable",
            )

    def _render(self, data: Mapping[str, Any], derive_text: bool, language: str | None
                ) -> Rendered:
        try:
            # Not normalised: a CR or LF from caller data must reach the header check
            # and be refused there, not be quietly folded away.
            values = {**data, LANGUAGE_VARIABLE: language or DEFAULT_LOCALE}
            subject = self._subject.render(values)
            html = self._html.render(values)
            if self._text is not None:
                text = self._text.render(values)
            else:
                text = html_to_text(html) if derive_text else ""
        except JinjaError as exc:
            raise TemplateError(
                f"template {self.name!r} could not be rendered: {exc.message or exc}",
                code="missing_variable" if "undefined" in str(exc) else "template_error",
            ) from None
        return self._sized(subject, html, text)

    def _sized(self, subject: str, html: str, text: str) -> Rendered:
        if len(html) + len(text) > MAX_RENDERED_CHARS:
            raise TemplateError(f"template {self.name!r} rendered too large a message")
        return Rendered(subject=subject, html=html, text=text)

    @cached_property
    def variables(self) -> frozenset[str]:
        """The names this version reads (jinja2.meta), worked out on first use."""
        return frozenset(variables_of(*self._sources)) - {LANGUAGE_VARIABLE}

    @cached_property
    def _reuse_plan(self) -> tuple[frozenset[str], frozenset[str]] | None:
        """What :meth:`render_reused` needs, worked out on first use: the names this
        version only inserts bare and the names it reads (``None``: never reuse)."""
        plain = plain_outputs(_HTML_ENV, *self._sources)
        return (plain, self.variables) if plain is not None else None

    def render_reused(self, data: Mapping[str, Any], cache: StencilCache, *,
                      language: str | None = None, common: Collection[str] = ()
                      ) -> Rendered:
        """What :meth:`render` gives, from a stencil shared by every message with the same
        fixed values (a campaign's shared data), filled with this message's own values.

        See :mod:`mailer.mail.stencil` for when a value is filled rather than fixed; a
        template that cannot be reused safely is rendered in full. ``common`` names the
        values other messages share (a campaign's data): a fixed value outside it would
        make a stencil for one message only, which costs more than a plain render.
        """
        self._check_present(data)
        plan = self._reuse_plan
        if plan is None:
            return self.render(data, language=language)
        slots, fixed = split_values(data, *plan)
        if any(name not in common for name in fixed):
            return self.render(data, language=language)
        key_text = fixed_key(fixed)
        if key_text is None:
            return self.render(data, language=language)
        stencil = cache.get((self, language, slots, key_text),
                            lambda: self._stencil(data, slots, language))
        if stencil is None:
            return self.render(data, language=language)
        subject, html, text = stencil.fill(tuple(data[k] for k in slots))
        return self._sized(subject, html, text)

    def _stencil(self, data: Mapping[str, Any], slots: tuple[str, ...], language: str | None
                 ) -> Stencil | None:
        # Rendered by render() itself, so a subclass's budget and sandbox apply as well.
        values = {**data, **{name: marker(i) for i, name in enumerate(slots)}}
        rendered = self.render(values, language=language)
        # The subject and an explicit text part are not escaped; a derived text part
        # reads the escaped HTML back, so it holds the value itself.
        return Stencil.cut((rendered.subject, rendered.html, rendered.text),
                           (False, True, False))


def _read_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def _read_optional(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


def variables_of(*sources: str | None) -> set[str]:
    """The names some file-template sources read (jinja2.meta, with our filters known)."""
    env = Environment(autoescape=True)
    env.filters["date"] = _localised_date
    names: set[str] = set()
    for source in sources:
        if source is not None:
            names |= meta.find_undeclared_variables(env.parse(source))
    return names


def load_file_template(folder: Path) -> Template:
    """Load ``template.toml``, ``body.html`` and optional ``body.txt`` from ``folder``, with
    the translations in its ``<locale>/`` sub-folders."""
    meta_ = _read_toml(folder / "template.toml")
    html = (folder / "body.html").read_text(encoding="utf-8")
    text = _read_optional(folder / "body.txt")
    common: dict[str, Any] = {
        "name": folder.name, "category": Category(meta_["category"]),
        "topic": meta_.get("topic"), "required": tuple(meta_.get("required", ())),
        "description": meta_.get("description", ""),
    }
    try:
        known = variables_of(meta_["subject"], html, text)
    except JinjaError as exc:
        raise TemplateError(f"template {folder.name!r} does not compile: {exc}") from None
    translations: dict[str, Template] = {}
    for child in sorted(folder.iterdir()):
        tag = normalise(child.name)
        if tag is None or not child.is_dir() or not (child / "body.html").is_file():
            continue
        own = _read_toml(child / "template.toml") if (child / "template.toml").is_file() else {}
        subject = own.get("subject", meta_["subject"])
        t_html = (child / "body.html").read_text(encoding="utf-8")
        t_text = _read_optional(child / "body.txt")
        try:
            extra = variables_of(subject, t_html, t_text) - known - {LANGUAGE_VARIABLE}
        except JinjaError as exc:
            raise TemplateError(f"template {folder.name!r} ({tag}) does not compile: {exc}"
                                ) from None
        if extra:
            # Acceptance checks the data against one version; a translation that reads
            # more would fail in the worker for exactly the people who speak it.
            raise TemplateError(f"template {folder.name!r} ({tag}) reads variables its "
                                f"default version does not: {', '.join(sorted(extra))}")
        translations[tag] = Template(subject=subject, html=t_html, text=t_text, **common)
    return Template(subject=meta_["subject"], html=html, text=text,
                    translations=translations, **common)


class Footer:
    """The compliance footer of promotions (SPEC 6): postal address, why, and both links.

    Written once with jinja2's i18n tags and translated by the gettext catalogues
    (SPEC 14: in the recipient's language); compiled once per language, on first use.
    """

    def __init__(self, folder: Path, messages: MessageCatalogues | None = None) -> None:
        self._sources = ((folder / "footer.html").read_text(encoding="utf-8"),
                         (folder / "footer.txt").read_text(encoding="utf-8"))
        # By default, the catalogues of the templates folder that holds ``_system``.
        self.messages = messages if messages is not None else catalogues_for(folder.parent)
        self._lock = threading.Lock()
        self._compiled: dict[str, tuple[JinjaTemplate, JinjaTemplate]] = {}
        self._plain_names: frozenset[str] | None = None
        #: Footers rendered once per language and campaign, filled per recipient.
        self.stencils = StencilCache()
        self._parts(DEFAULT_LOCALE)  # a broken footer stops start-up, not the first send

    def _parts(self, language: str) -> tuple[JinjaTemplate, JinjaTemplate]:
        with self._lock:
            found = self._compiled.get(language)
        if found is not None:
            return found
        compiled = []
        for autoescape, source in zip((True, False), self._sources, strict=True):
            env = ImmutableSandboxedEnvironment(
                autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=True,
                extensions=["jinja2.ext.i18n"])
            env.install_gettext_translations(  # type: ignore[attr-defined]
                self.messages.translations(language), newstyle=True)
            compiled.append(env.from_string(source))
        parts = (compiled[0], compiled[1])
        with self._lock:
            self._compiled[language] = parts
        return parts

    def _plain(self) -> frozenset[str]:
        if self._plain_names is None:
            # Parsed as the parts are compiled: newstyle gettext, whose calls take a trans
            # block's variables as keywords (see mailer.mail.stencil).
            env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.i18n"])
            env.install_null_translations(newstyle=True)  # type: ignore[attr-defined]
            self._plain_names = plain_outputs(env, *self._sources) or frozenset()
        return self._plain_names

    def _render(self, values: Mapping[str, str], language: str) -> tuple[str, str]:
        html_part, text_part = self._parts(language)
        return html_part.render(values), text_part.render(values)

    def _filled(self, values: Mapping[str, str], language: str) -> tuple[str, str]:
        """The footer's two parts from a stencil per language and fixed values (the links
        differ per recipient, the topic and postal address per campaign)."""
        slots, fixed = split_values(values, self._plain(), frozenset(values))
        key_text = fixed_key(fixed)
        if key_text is None:
            return self._render(values, language)

        def build() -> Stencil | None:
            marked = {**fixed, **{name: marker(i) for i, name in enumerate(slots)}}
            return Stencil.cut(self._render(marked, language), (True, False))

        stencil = self.stencils.get(("footer", language, slots, key_text), build)
        if stencil is None:
            return self._render(values, language)
        footer_html, footer_text = stencil.fill(tuple(values[k] for k in slots))
        return footer_html, footer_text

    def apply(self, rendered: Rendered, values: Mapping[str, str], language: str = DEFAULT_LOCALE,
              *, reuse: bool = False) -> Rendered:
        """Return ``rendered`` with the footer, in ``language``, inserted before ``</body>``
        (or appended); ``reuse`` fills a cached stencil instead of rendering (same bytes)."""
        footer_html, footer_text = (self._filled(values, language) if reuse
                                    else self._render(values, language))
        html = rendered.html
        at = html.lower().rfind("</body>")
        html = html[:at] + footer_html + html[at:] if at >= 0 else html + footer_html
        return Rendered(rendered.subject, html, rendered.text + footer_text)


class Catalogue:
    """All file templates of a folder, compiled once at start-up."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._templates: dict[str, Template] = {}
        for child in sorted(folder.iterdir()):
            if not child.name.startswith("_") and (child / "template.toml").is_file():
                self._templates[child.name] = load_file_template(child)
        #: The gettext catalogues of the footer and the pages (SPEC 14).
        self.messages = catalogues_for(folder)
        self.footer = Footer(folder / "_system", self.messages)
        #: Asked for names no file template has: the stored marketing templates, wired by
        #: :class:`mailer.runtime.Runtime`. File templates always win a name.
        self.fallback: Callable[[str], Template | None] | None = None

    def get(self, name: str) -> Template:
        """The named template, or :class:`TemplateError` (a 422) when unknown."""
        template = self._templates.get(name)
        if template is None and self.fallback is not None:
            template = self.fallback(name)
        if template is None:
            raise TemplateError(f"unknown template {name!r}", code="unknown_template")
        return template

    def add(self, template: Template) -> None:
        """Register a template stored elsewhere (marketing templates in the database)."""
        self._templates[template.name] = template

    def __iter__(self) -> Any:
        return iter(self._templates.values())
