"""``/v1/recipients`` and ``/v1/topics``: profiles, consent and topics (SPEC 3, 7)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import insert, select, update

from mailer.api.deps import parse_address, runtime, scoped
from mailer.errors import ValidationFailed
from mailer.keys import ApiKey
from mailer.mail.headers import check_header_value
from mailer.mail.locales import normalise as normalise_locale
from mailer.preferences.access import export_recipient, profile, recipient_view
from mailer.preferences.double_opt_in import API_SOURCES, OWN_CHANNEL_SOURCES, DoubleOptIn
from mailer.preferences.erasure import erase
from mailer.runtime import Runtime
from mailer.store.recipients import (
    get_recipient,
    record_consent,
    refuse_silent_resubscription,
    upsert_recipient,
)
from mailer.store.schema import topics
from mailer.times import iso
from suppression.consent import SOURCES, THIRD_PARTY_SHARING

router = APIRouter(tags=["recipients"])

RecipientsKey = Annotated[ApiKey, Depends(scoped("recipients"))]
Rt = Annotated[Runtime, Depends(runtime)]


class RecipientIn(BaseModel):
    """A profile as a service registers it."""

    model_config = ConfigDict(extra="forbid")
    email: str = Field(max_length=320)
    name: str | None = Field(default=None, max_length=200)
    locale: str | None = Field(default=None, max_length=35)
    attributes: dict[str, Any] = Field(default_factory=dict)
    account_active: bool = True

    @field_validator("locale")
    @classmethod
    def _locale_is_a_language_tag(cls, value: str | None) -> str | None:
        # SPEC 14: a BCP 47 tag, kept in its canonical spelling (de_at -> de-AT).
        if value is None or not value.strip():
            return None
        tag = normalise_locale(value)
        if tag is None:
            raise ValueError("locale must be a language tag, like de or pt-BR")
        return tag


class ConsentIn(BaseModel):
    """One grant or revoke for the ledger."""

    model_config = ConfigDict(extra="forbid")
    topic: str = Field(max_length=100)
    granted: bool
    source: str = Field(max_length=40)
    policy_version: str | None = Field(default=None, max_length=40)
    occurred_at: datetime | None = None
    evidence: dict[str, Any] | None = None


#: A topic name (SPEC 3): lower-case ASCII that fits a List-Id (RFC 2919) as it is.
TOPIC_NAME = re.compile(r"(?=[a-z0-9._-]{1,64}\Z)[a-z0-9][a-z0-9_-]*(?:\.[a-z0-9_-]+)*")


#: Characters a topic's title (one line) or description (line breaks and tabs allowed) may
#: not hold: controls and lone surrogates, which no page shows and UTF-8 cannot store.
_TITLE_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_DESCRIPTION_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


class TopicTranslationIn(BaseModel):
    """A topic's title and description in one language (SPEC 14)."""

    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)

    @field_validator("title")
    @classmethod
    def _title_is_one_printable_line(cls, value: str) -> str:
        if _TITLE_FORBIDDEN.search(value):
            raise ValueError("the title must be one line of printable text")
        return value

    @field_validator("description")
    @classmethod
    def _description_is_printable(cls, value: str) -> str:
        if _DESCRIPTION_FORBIDDEN.search(value):
            raise ValueError("the description may not hold control characters")
        return value


class TopicIn(TopicTranslationIn):
    """A marketing topic, with its title and description by language tag.

    Title and description, and their checks, are those of each translation.
    """

    third_party: bool = False
    double_opt_in: bool = False
    translations: dict[str, TopicTranslationIn] | None = Field(default=None, max_length=50)

    @field_validator("translations")
    @classmethod
    def _tags_are_languages(cls, value: dict[str, TopicTranslationIn] | None
                            ) -> dict[str, TopicTranslationIn] | None:
        if not value:
            return None
        out: dict[str, TopicTranslationIn] = {}
        for key, text in value.items():
            tag = normalise_locale(key)
            if tag is None or tag in out:
                raise ValueError(f"{key[:40]!r} is not a language tag, or appears twice")
            out[tag] = text
        return out


@router.put("/v1/recipients/{external_id}")
def put_recipient(
    external_id: str, body: RecipientIn, key: RecipientsKey, rt: Rt
) -> JSONResponse:
    """Create (201) or update (200) a profile."""
    if not external_id or len(external_id) > 200:
        raise ValidationFailed("external_id must be 1 to 200 characters")
    if body.name is not None:
        check_header_value("name", body.name)
    address = parse_address(rt, body.email)
    with rt.engine.begin() as conn:
        row, created = upsert_recipient(conn, external_id, address, body.model_dump(), rt.clock())
    return JSONResponse(profile(row), status_code=201 if created else 200)


@router.get("/v1/recipients/{external_id}")
def get_recipient_view(external_id: str, key: RecipientsKey, rt: Rt) -> dict[str, Any]:
    """Profile, current preferences, suppressions and the full consent ledger."""
    with rt.engine.connect() as conn:
        row, held = recipient_view(conn, external_id)
    return {**profile(row), **held}


@router.delete("/v1/recipients/{external_id}", status_code=204)
def delete_recipient(external_id: str, key: RecipientsKey, rt: Rt) -> Response:
    """Erase the recipient (SPEC 3): keyed-hash ``erased`` suppression, pseudonymised ledger."""
    erase(rt, external_id)
    return Response(status_code=204)


@router.get("/v1/recipients/{external_id}/export")
def export_recipient_view(external_id: str, key: RecipientsKey, rt: Rt) -> dict[str, Any]:
    """Everything held about the recipient, as JSON (the right of access)."""
    with rt.engine.connect() as conn:
        return export_recipient(conn, external_id)


#: Where ``evidence`` may name the signup form's URL.
FORM_URL_KEYS = ("form_url", "form", "url")


def _has_signup_evidence(evidence: dict[str, Any] | None) -> bool:
    """A form URL plus the IP or user agent of whoever submitted it (SPEC 3)."""
    def given(name: str) -> bool:
        value = (evidence or {}).get(name)
        return isinstance(value, str) and bool(value.strip())

    return any(given(k) for k in FORM_URL_KEYS) and (given("ip") or given("user_agent"))


def _check_source(external_id: str, body: ConsentIn, rt: Runtime) -> None:
    """Refuse, before anything is written, a source the API may not claim (SPEC 3).

    ``preference_center``, ``double_opt_in``, ``unsubscribe_link``, ``one_click``,
    ``mailto`` and ``complaint`` are the person's own channels (or the reports of their
    mailbox); only our pages, the inbound listener and the webhooks see those happen. An
    API key claiming one could turn a person's "no" into "yes" in their name.
    """
    if body.source not in SOURCES | OWN_CHANNEL_SOURCES:
        raise ValidationFailed(
            f"unknown consent source; choose from {', '.join(sorted(API_SOURCES))}",
            {"source": body.source}, code="invalid_source",
        )
    if body.source not in API_SOURCES:
        raise ValidationFailed(
            f"source {body.source!r} is recorded only by the person's own channels; "
            f"the API may record {', '.join(sorted(API_SOURCES))}",
            {"source": body.source, "allowed": sorted(API_SOURCES)}, code="source_not_allowed",
        )
    if body.granted and body.source == "signup_form" and not _has_signup_evidence(body.evidence):
        # The no-silent-re-subscription answer comes first, as it always has: a form
        # without evidence cannot turn a "no" back to "yes" (409), and even for a first
        # grant it must show where and from whom it came (422).
        with rt.engine.connect() as conn:
            row = get_recipient(conn, external_id)
            refuse_silent_resubscription(conn, row.id, body.topic, body.source,
                                         has_evidence=bool(body.evidence))
        raise ValidationFailed(
            "a signup_form grant needs evidence: the form URL (form_url) plus the ip or "
            "user_agent of the submission",
            {"evidence": ["form_url", "ip|user_agent"]}, code="evidence_required",
        )


@router.post("/v1/recipients/{external_id}/consents", status_code=201, response_model=None)
def post_consent(
    external_id: str, body: ConsentIn, key: RecipientsKey, rt: Rt
) -> dict[str, Any] | JSONResponse:
    """Append a grant or revoke; 409 ``consent_conflict`` for a silent re-subscription.

    Only ``api``, ``import``, ``admin`` and ``signup_form`` (with evidence) may be
    claimed here; anything else is 422 ``source_not_allowed``. A grant for a
    ``double_opt_in`` topic is not a ledger grant yet, whatever its source: the 201 body
    says ``"status": "pending"`` (a consent request was created and a confirmation mail
    sent) until the person confirms from that mail (SPEC 3).
    """
    _check_source(external_id, body, rt)
    now = rt.clock()
    occurred = body.occurred_at or now
    if occurred.tzinfo is None:
        raise ValidationFailed("occurred_at needs a time zone")
    occurred = occurred.astimezone(UTC)
    if occurred > now:
        raise ValidationFailed("occurred_at is in the future")
    if body.granted:
        pending = DoubleOptIn(rt).request(
            external_id, body.topic, body.source,
            body.policy_version or rt.settings.policy_version, occurred, body.evidence,
        )
        if pending is not None:
            return JSONResponse(
                {"id": None, "request_id": pending.request_id, "status": "pending",
                 "topic": body.topic, "granted": True, "source": body.source,
                 "occurred_at": iso(occurred), "confirmation": pending.confirmation,
                 "confirmation_message_id": pending.message_id},
                status_code=201,
            )
    with rt.engine.begin() as conn:
        row = get_recipient(conn, external_id)
        event_id = record_consent(
            conn, row, body.topic, body.granted, body.source,
            body.policy_version or rt.settings.policy_version, occurred, now, body.evidence,
            explicit_version=body.policy_version is not None,
        )
    return {"id": event_id, "status": "recorded", "topic": body.topic, "granted": body.granted,
            "source": body.source, "occurred_at": iso(occurred)}


def topic_view(row: Any) -> dict[str, Any]:
    """A topic as the API shows it."""
    return {"name": row.name, "title": row.title, "description": row.description,
            "third_party": bool(row.third_party), "double_opt_in": bool(row.double_opt_in),
            "translations": dict(row.translations or {})}


@router.get("/v1/topics")
def list_topics(
    key: Annotated[ApiKey, Depends(scoped("marketing", "recipients"))], rt: Rt
) -> dict[str, Any]:
    """Every topic."""
    with rt.engine.connect() as conn:
        rows = conn.execute(select(topics).order_by(topics.c.name))
        return {"topics": [topic_view(r) for r in rows]}


@router.put("/v1/topics/{name}")
def put_topic(
    name: str, body: TopicIn, key: Annotated[ApiKey, Depends(scoped("marketing"))], rt: Rt
) -> JSONResponse:
    """Create (201) or update (200) a topic; 422 ``invalid_topic_name`` for a bad name."""
    # The name becomes the List-Id's list-label (RFC 2919: dot-atom-text, ASCII only), so
    # it is checked here, once, instead of failing every send of the topic later.
    if not TOPIC_NAME.fullmatch(name) or name == THIRD_PARTY_SHARING:
        raise ValidationFailed(
            "topic names are 1 to 64 of a-z, 0-9, _ and -, in dot-separated parts, "
            "starting with a letter or digit", code="invalid_topic_name")
    values = body.model_dump()
    with rt.engine.begin() as conn:
        exists = conn.execute(select(topics.c.name).where(topics.c.name == name)).first()
        if exists:
            conn.execute(update(topics).where(topics.c.name == name).values(**values))
        else:
            conn.execute(insert(topics).values(name=name, created_at=rt.clock(), **values))
        row = conn.execute(select(topics).where(topics.c.name == name)).one()
    return JSONResponse(topic_view(row), status_code=200 if exists else 201)
