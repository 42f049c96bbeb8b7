"""``/v1/suppressions``: list, add and (admin only) lift suppression entries (SPEC 4, 7)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select

from mailer.api.deps import parse_address, runtime, scoped
from mailer.errors import NotFound, ValidationFailed
from mailer.keys import ApiKey
from mailer.runtime import Runtime
from mailer.store.recipients import SUPPRESSION_REASONS, add_suppression
from mailer.store.schema import suppressions
from mailer.times import iso

router = APIRouter(tags=["suppressions"])
Rt = Annotated[Runtime, Depends(runtime)]

#: Reasons a caller may set by hand. ``erased`` only comes from erasure (it promises the
#: profile is gone) and ``soft_bounce_limit`` only from the bounce counter (it expires).
MANUAL_REASONS = frozenset({"manual", "hard_bounce", "complaint", "unsubscribed"})
#: Page size of ``GET /v1/suppressions`` unless ``limit`` says otherwise.
DEFAULT_PAGE = 100
MAX_PAGE = 1000


class SuppressionIn(BaseModel):
    """A manual suppression entry."""

    model_config = ConfigDict(extra="forbid")
    email: str = Field(max_length=320)
    scope: str = "all"
    reason: str = "manual"


def view(row: Any) -> dict[str, Any]:
    """An entry as the API shows it; erased entries have no ``email``, only the hash."""
    return {"id": row.id, "email": row.email, "email_hash": row.email_hash, "scope": row.scope,
            "reason": row.reason, "source": row.source, "created_at": iso(row.created_at),
            "expires_at": iso(row.expires_at)}


def _cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"s:{last_id}".encode()).rstrip(b"=").decode()


def _after(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, number = text.partition(":")
        if kind != "s" or not number.isdigit():
            raise ValueError
        return int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed("cursor is not one this API handed out", code="invalid_cursor") \
            from None


@router.get("/v1/suppressions")
def list_suppressions(
    key: Annotated[ApiKey, Depends(scoped("recipients"))],
    rt: Rt,
    email: str | None = None,
    reason: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> dict[str, Any]:
    """Entries oldest first, filtered by address and reason; ``next_cursor`` pages on."""
    query = select(suppressions).where(suppressions.c.id > _after(cursor))
    if email is not None:
        # By keyed hash, so erased entries (address gone) are found as well.
        query = query.where(suppressions.c.email_hash == parse_address(rt, email).hash)
    if reason is not None:
        if reason not in SUPPRESSION_REASONS:
            choices = ", ".join(sorted(SUPPRESSION_REASONS))
            raise ValidationFailed(f"reason must be one of {choices}")
        query = query.where(suppressions.c.reason == reason)
    with rt.engine.connect() as conn:
        rows = list(conn.execute(query.order_by(suppressions.c.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return {"suppressions": [view(r) for r in rows],
            "next_cursor": _cursor(rows[-1].id) if more else None}


@router.post("/v1/suppressions")
def add(
    body: SuppressionIn, key: Annotated[ApiKey, Depends(scoped("recipients"))], rt: Rt
) -> JSONResponse:
    """Add an entry (201), or return the one with the same address and reason (200)."""
    if body.scope not in ("all", "marketing"):
        raise ValidationFailed("scope must be all or marketing", code="invalid_suppression")
    if body.reason not in MANUAL_REASONS:
        raise ValidationFailed(f"reason must be one of {', '.join(sorted(MANUAL_REASONS))}",
                               code="invalid_suppression")
    address = parse_address(rt, body.email)
    with rt.engine.begin() as conn:
        created = add_suppression(conn, address, address.hash, body.scope, body.reason,
                                  f"api:{key.name}", rt.clock())
        row = conn.execute(select(suppressions).where(
            suppressions.c.email_hash == address.hash, suppressions.c.reason == body.reason
        )).one()
    return JSONResponse(view(row), status_code=201 if created else 200)


@router.delete("/v1/suppressions/{email}", status_code=204)
def lift(
    email: str,
    key: Annotated[ApiKey, Depends(scoped("admin"))],
    rt: Rt,
    reason: str | None = None,
) -> Response:
    """Lift every entry of an address, or only the one with ``reason`` (admin only, SPEC 4)."""
    address = parse_address(rt, email)
    statement = delete(suppressions).where(suppressions.c.email_hash == address.hash)
    if reason is not None:
        statement = statement.where(suppressions.c.reason == reason)
    with rt.engine.begin() as conn:
        removed = conn.execute(statement).rowcount
    if not removed:
        raise NotFound("no suppression entry for this address")
    return Response(status_code=204)
