"""Message templates: loaded and compiled once, rendered strictly in jinja2's sandbox."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined
from jinja2 import TemplateError as JinjaError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailer.errors import TemplateError
from mailer.mail.text import html_to_text
from suppression.policy import Category

#: Upper bound on rendered output, so a hostile template cannot fill memory or mailboxes.
MAX_RENDERED_CHARS = 2_000_000


@dataclass(frozen=True)
class Rendered:
    """A rendered message body and subject."""

    subject: str
    html: str
    text: str


def _environment(autoescape: bool) -> ImmutableSandboxedEnvironment:
    # StrictUndefined: a missing variable is an error at accept time (422), never a
    # blank in a sent mail. The sandbox keeps templates away from Python internals.
    return ImmutableSandboxedEnvironment(
        autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=True
    )


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
    ) -> None:
        self.name = name
        self.category = category
        self.topic = topic
        self.required = required
        self.description = description
        try:
            self._subject = _TEXT_ENV.from_string(subject)
            self._html = _HTML_ENV.from_string(html)
            self._text = _TEXT_ENV.from_string(text) if text is not None else None
        except JinjaError as exc:
            raise TemplateError(f"template {name!r} does not compile: {exc}") from None

    def missing(self, data: Mapping[str, Any]) -> list[str]:
        """The required variables absent from ``data``."""
        return [key for key in self.required if key not in data]

    def render(self, data: Mapping[str, Any], *, derive_text: bool = True) -> Rendered:
        """Render all parts; raise :class:`TemplateError` for missing or broken variables.

        ``derive_text=False`` leaves the text part empty when the template has none:
        the accept-time check needs only to know that everything renders, and deriving
        text from HTML was 43 % of the API's CPU per message.
        """
        missing = self.missing(data)
        if missing:
            raise TemplateError(
                f"template {self.name!r} needs variables: {', '.join(missing)}",
                details={"missing": missing},
                code="missing_variable",
            )
        try:
            # Not normalised: a CR or LF from caller data must reach the header check
            # and be refused there, not be quietly folded away.
            subject = self._subject.render(data)
            html = self._html.render(data)
            if self._text is not None:
                text = self._text.render(data)
            else:
                text = html_to_text(html) if derive_text else ""
        except JinjaError as exc:
            raise TemplateError(
                f"template {self.name!r} could not be rendered: {exc.message or exc}",
                code="missing_variable" if "undefined" in str(exc) else "template_error",
            ) from None
        if len(html) + len(text) > MAX_RENDERED_CHARS:
            raise TemplateError(f"template {self.name!r} rendered too large a message")
        return Rendered(subject=subject, html=html, text=text)


def load_file_template(folder: Path) -> Template:
    """Load ``template.toml``, ``body.html`` and optional ``body.txt`` from ``folder``."""
    with (folder / "template.toml").open("rb") as fh:
        meta = tomllib.load(fh)
    text_file = folder / "body.txt"
    return Template(
        name=folder.name,
        category=Category(meta["category"]),
        topic=meta.get("topic"),
        subject=meta["subject"],
        html=(folder / "body.html").read_text(encoding="utf-8"),
        text=text_file.read_text(encoding="utf-8") if text_file.exists() else None,
        required=tuple(meta.get("required", ())),
        description=meta.get("description", ""),
    )


class Footer:
    """The compliance footer of promotions (SPEC 6): postal address, why, and both links."""

    def __init__(self, folder: Path) -> None:
        self._html = _HTML_ENV.from_string((folder / "footer.html").read_text(encoding="utf-8"))
        self._text = _TEXT_ENV.from_string((folder / "footer.txt").read_text(encoding="utf-8"))

    def apply(self, rendered: Rendered, values: Mapping[str, str]) -> Rendered:
        """Return ``rendered`` with the footer inserted before ``</body>`` (or appended)."""
        footer_html = self._html.render(values)
        html = rendered.html
        at = html.lower().rfind("</body>")
        html = html[:at] + footer_html + html[at:] if at >= 0 else html + footer_html
        return Rendered(rendered.subject, html, rendered.text + self._text.render(values))


class Catalogue:
    """All file templates of a folder, compiled once at start-up."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._templates: dict[str, Template] = {}
        for child in sorted(folder.iterdir()):
            if not child.name.startswith("_") and (child / "template.toml").is_file():
                self._templates[child.name] = load_file_template(child)
        self.footer = Footer(folder / "_system")
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
