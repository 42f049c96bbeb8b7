"""``/v1/messages``: accept single and batch sends, and report on a message (SPEC 7)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from mailer.api.deps import api_key, runtime
from mailer.errors import Forbidden, NotFound, RequestError, ValidationFailed
from mailer.keys import ApiKey
from mailer.mail.locales import is_valid as is_valid_locale
from mailer.runtime import Runtime
from mailer.sending.accept import MAX_BATCH, Acceptor, Refused, SendRequest, error_body
from mailer.store.schema import message_events, messages
from mailer.times import iso

router = APIRouter(prefix="/v1/messages", tags=["messages"])


class To(BaseModel):
    """A recipient given as an object."""

    model_config = ConfigDict(extra="forbid")
    email: str = Field(max_length=320)
    external_id: str | None = Field(default=None, max_length=200)
    name: str | None = Field(default=None, max_length=200)


class MessageIn(BaseModel):
    """One message to send."""

    model_config = ConfigDict(extra="forbid")
    template: str = Field(max_length=100)
    to: str | To
    data: dict[str, Any] = Field(default_factory=dict)
    topic: str | None = Field(default=None, max_length=100)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    send_at: datetime | None = None
    #: SPEC 14: which language version to send, over the recipient's own locale.
    locale: str | None = Field(default=None, max_length=35)


class BatchIn(BaseModel):
    """Up to 1000 messages."""

    model_config = ConfigDict(extra="forbid")
    messages: list[dict[str, Any]] = Field(max_length=MAX_BATCH)


def _to_request(body: MessageIn) -> SendRequest:
    # A bare string is not re-validated as To: its length cap would be a 500 here, and
    # the address check that follows answers 422 invalid_address for any bad address.
    to = body.to
    email, external_id, name = ((to.email, to.external_id, to.name) if isinstance(to, To)
                                else (to, None, None))
    send_at = body.send_at
    if send_at is not None and send_at.tzinfo is None:
        raise ValidationFailed("send_at needs a time zone, e.g. 2030-01-01T09:00:00Z")
    try:
        send_at = send_at.astimezone(UTC) if send_at else None
    except OverflowError:  # e.g. 9999-12-31T23:59-23:59 is past the last UTC datetime
        raise ValidationFailed("send_at is out of range") from None
    if body.locale is not None and not is_valid_locale(body.locale):
        raise ValidationFailed("locale is not a language tag (write it like de or pt-BR)",
                               {"locale": body.locale}, code="invalid_locale")
    # The body as JSON only fingerprints an idempotent request (a replay must match it).
    raw = body.model_dump(mode="json", exclude_none=True) if body.idempotency_key else {}
    return SendRequest(
        template=body.template, email=email, external_id=external_id, name=name,
        data=body.data, topic=body.topic, idempotency_key=body.idempotency_key,
        send_at=send_at, body=raw, locale=body.locale,
    )


@router.post("", status_code=202)
def send_message(
    body: MessageIn,
    key: Annotated[ApiKey, Depends(api_key)],
    rt: Annotated[Runtime, Depends(runtime)],
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """Accept one message: 202 with its id and status (queued, scheduled or suppressed)."""
    if idempotency_key and not body.idempotency_key:
        body = body.model_copy(update={"idempotency_key": idempotency_key})
    [result] = Acceptor(rt).accept(key, [_to_request(body)])
    if isinstance(result, Refused):
        raise result.error
    return JSONResponse(result.as_json(), status_code=202)


@router.post("/batch", status_code=202)
def send_batch(
    body: BatchIn,
    key: Annotated[ApiKey, Depends(api_key)],
    rt: Annotated[Runtime, Depends(runtime)],
) -> dict[str, Any]:
    """Accept up to 1000 messages; results come back in input order, errors inline."""
    requests: list[SendRequest | None] = []
    errors: dict[int, dict[str, Any]] = {}
    for index, item in enumerate(body.messages):
        try:
            parsed = MessageIn.model_validate(item)
            requests.append(_to_request(parsed))
        except RequestError as exc:
            requests.append(None)
            errors[index] = error_body(exc)
        except ValueError as exc:  # pydantic.ValidationError
            requests.append(None)
            errors[index] = {
                "code": "validation_error",
                "message": "the message does not match the schema",
                "details": [str(e.get("msg")) for e in getattr(exc, "errors", list)()],
            }
    valid = [r for r in requests if r is not None]
    accepted = iter(Acceptor(rt).accept(key, valid))
    results: list[dict[str, Any]] = []
    for index, req in enumerate(requests):
        if req is None:
            results.append({"error": errors[index]})
            continue
        results.append(next(accepted).as_json())
    return {"results": results}


@router.get("/{message_id}")
def get_message(
    message_id: str,
    key: Annotated[ApiKey, Depends(api_key)],
    rt: Annotated[Runtime, Depends(runtime)],
) -> dict[str, Any]:
    """A message's status, attempts, SMTP response and history."""
    with rt.engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
        # Another key's message is reported as absent, not forbidden: ids are not an oracle.
        if row is None or (row.api_key_id != key.id and not key.allows("admin")
                           and row.campaign_id is None):
            raise NotFound("no such message")
        if row.campaign_id is not None and not key.allows("marketing"):
            raise Forbidden("campaign messages need the marketing scope")
        events = conn.execute(
            select(message_events.c.at, message_events.c.type, message_events.c.detail)
            .where(message_events.c.message_id == message_id)
            .order_by(message_events.c.id)
        )
        history = [{"at": iso(e.at), "type": e.type, "detail": e.detail} for e in events]
    return {**message_summary(row), "events": history}


def message_summary(row: Any) -> dict[str, Any]:
    """A message row as the API shows it, without its history (``GET /v1/messages``)."""
    return {
        "id": row.id, "category": row.category, "template": row.template, "topic": row.topic,
        "status": row.status, "reason": row.reason, "attempts": row.attempts,
        "created_at": iso(row.created_at), "sent_at": iso(row.sent_at),
        "send_at": iso(row.send_at), "smtp_response": row.smtp_response,
        "smtp_code": row.smtp_code, "message_id": row.message_id_header,
        "campaign_id": row.campaign_id,
    }
