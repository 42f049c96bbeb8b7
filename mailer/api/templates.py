"""``/v1/templates/{name}``: store and read marketing templates (SPEC 7)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mailer.api.deps import runtime, scoped
from mailer.errors import Conflict, NotFound, ValidationFailed
from mailer.keys import ApiKey
from mailer.mail.checks import MAX_SOURCE_CHARS
from mailer.mail.stored import MAX_TRANSLATIONS, StoredTemplate, load, save, validate_name
from mailer.runtime import Runtime
from mailer.store.recipients import topic_row
from mailer.times import iso
from suppression.policy import Category

router = APIRouter(prefix="/v1/templates", tags=["templates"])

Rt = Annotated[Runtime, Depends(runtime)]


class TranslationIn(BaseModel):
    """One language version of a stored template (SPEC 14)."""

    model_config = ConfigDict(extra="forbid")
    subject: str = Field(min_length=1, max_length=MAX_SOURCE_CHARS["subject"])
    html: str = Field(min_length=1, max_length=MAX_SOURCE_CHARS["html"])
    text: str | None = Field(default=None, max_length=MAX_SOURCE_CHARS["text"])


class TemplateIn(BaseModel):
    """A marketing template: subject, HTML and optional text, all jinja2 sources, and its
    translations by language tag (``{"de": {subject, html, text?}}``)."""

    model_config = ConfigDict(extra="forbid")
    category: str = Field(max_length=40)
    topic: str = Field(min_length=1, max_length=100)
    subject: str = Field(min_length=1, max_length=MAX_SOURCE_CHARS["subject"])
    html: str = Field(min_length=1, max_length=MAX_SOURCE_CHARS["html"])
    text: str | None = Field(default=None, max_length=MAX_SOURCE_CHARS["text"])
    translations: dict[str, TranslationIn] | None = Field(default=None,
                                                          max_length=MAX_TRANSLATIONS)


def stored_view(row: Any) -> dict[str, Any]:
    """A stored template as the API shows it."""
    return {
        "name": row.name, "source": "stored", "category": row.category, "topic": row.topic,
        "subject": row.subject, "html": row.html, "text": row.text,
        "variables": list(row.variables), "version": row.version,
        "translations": dict(row.translations or {}),
        "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
    }


@router.put("/{name}")
def put_template(
    name: str, body: TemplateIn, key: Annotated[ApiKey, Depends(scoped("marketing"))], rt: Rt
) -> JSONResponse:
    """Create (201) or replace (200) a stored template; 422 when it is unsafe or broken."""
    validate_name(name)
    if body.category != Category.PROMOTION.value:
        # Transactional and legal templates are files, reviewed and deployed with the code.
        raise ValidationFailed("stored templates are promotions; other categories are files",
                               code="invalid_category")
    if any(t.name == name for t in rt.catalogue):
        raise Conflict(f"{name!r} is a file template", code="file_template")
    sources = body.model_dump()
    template = StoredTemplate(name, body.topic, body.subject, body.html, body.text,
                              translations=sources["translations"])
    with rt.engine.begin() as conn:
        topic_row(conn, body.topic)
        row, created = save(conn, name, template, sources, key.id, rt.clock())
    return JSONResponse(stored_view(row), status_code=201 if created else 200)


@router.get("/{name}")
def get_template(
    name: str,
    key: Annotated[ApiKey, Depends(scoped("marketing", "messages:transactional",
                                          "messages:legal"))],
    rt: Rt,
) -> dict[str, Any]:
    """A stored template with its sources, or a file template's description."""
    with rt.engine.connect() as conn:
        row = load(conn, name)
    if row is not None:
        return stored_view(row)
    for template in rt.catalogue:
        if template.name == name:
            return {"name": name, "source": "file", "category": template.category.value,
                    "topic": template.topic, "description": template.description,
                    "required": list(template.required),
                    "translations": sorted(template.translations)}
    raise NotFound(f"no template {name!r}")
