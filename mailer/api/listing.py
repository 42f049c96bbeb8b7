"""Finding things (SPEC 7): ``GET /v1/messages`` with filters, ``GET /v1/recipients?email=``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from mailer.api.deps import parse_address, runtime, scoped
from mailer.api.messages import message_summary
from mailer.api.models import MessagePage, RecipientView
from mailer.errors import NotFound, ValidationFailed
from mailer.keys import ApiKey
from mailer.preferences.access import profile, recipient_view
from mailer.runtime import Runtime
from mailer.store.listing import DEFAULT_PAGE, MAX_PAGE, Cursor, MessageFilter, list_messages
from mailer.store.recipients import find_by_hash
from mailer.store.status import MessageStatus
from suppression.policy import Category

router = APIRouter()

Rt = Annotated[Runtime, Depends(runtime)]

_MESSAGE_PARAMETERS = frozenset({"status", "category", "template", "to", "campaign_id",
                                 "since", "until", "cursor", "limit"})


def _refuse_unknown(request: Request, known: frozenset[str]) -> None:
    """422 for a parameter we do not know: a misspelt filter must not list everything."""
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise ValidationFailed(f"unknown query parameter {unknown[0]!r}",
                               {"unknown": unknown, "known": sorted(known)})


def _moment(name: str, value: str | None) -> datetime | None:
    """An ISO 8601 date or time; without a zone it is UTC (as in ``/v1/stats``)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationFailed(f"{name} is an ISO 8601 date or time, e.g. 2026-11-01 or "
                               "2026-11-01T09:00:00Z", {name: value}) from None
    try:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:
        raise ValidationFailed(f"{name} is out of range", {name: value}) from None


@router.get("/v1/messages", tags=["messages"], response_model=MessagePage)
def find_messages(
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("admin"))],
    rt: Rt,
    status: Annotated[MessageStatus | None, Query()] = None,
    category: Annotated[Category | None, Query()] = None,
    template: Annotated[str | None, Query(max_length=100)] = None,
    to: Annotated[str | None, Query(max_length=320, description="an address")] = None,
    campaign_id: Annotated[str | None, Query(max_length=32)] = None,
    since: Annotated[str | None, Query(description="created at or after (ISO 8601)")] = None,
    until: Annotated[str | None, Query(description="created before (ISO 8601)")] = None,
    cursor: Annotated[str | None, Query(max_length=200,
                                        description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> dict[str, Any]:
    """Messages newest first, each as ``GET /v1/messages/{id}`` shows it without events."""
    _refuse_unknown(request, _MESSAGE_PARAMETERS)
    where = MessageFilter(
        status=status.value if status is not None else None,
        category=category.value if category is not None else None,
        template=template,
        # The keyed hash of the normalised address: the same lookup suppressions use.
        to_hash=parse_address(rt, to).hash if to is not None else None,
        campaign_id=campaign_id,
        since=_moment("since", since),
        until=_moment("until", until),
    )
    after = Cursor.decode(cursor) if cursor is not None else None
    with rt.engine.connect() as conn:
        rows, following = list_messages(conn, where, limit, after)
    return {"items": [message_summary(r) for r in rows],
            "next_cursor": following.encode() if following else None}


@router.get("/v1/recipients", tags=["recipients"], response_model=RecipientView)
def find_recipient(
    request: Request,
    key: Annotated[ApiKey, Depends(scoped("recipients"))],
    rt: Rt,
    email: Annotated[str, Query(max_length=320, description="the address, any case")],
) -> dict[str, Any]:
    """The recipient with this (normalised) address, as ``GET /v1/recipients/{id}``; or 404."""
    _refuse_unknown(request, frozenset({"email"}))
    address = parse_address(rt, email)
    with rt.engine.connect() as conn:
        found = find_by_hash(conn, address.hash)
        if found is None:
            raise NotFound("no recipient with this address")
        row, held = recipient_view(conn, found.external_id)
    return {**profile(row), **held}
