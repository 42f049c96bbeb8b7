"""``/v1/webhook-endpoints``: where the events of SPEC 13 are sent (admin only, SPEC 7).

Registration checks the target (:mod:`mailer.events.targets`) before anything is
written, and answers the secret once. Nothing here sends a webhook: delivery is the
scheduler's (never inside an API request).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mailer.api.deps import runtime, scoped
from mailer.events import endpoints
from mailer.events.secrets import SecretBox
from mailer.events.targets import MAX_URL, check_target
from mailer.keys import ApiKey
from mailer.runtime import Runtime

router = APIRouter(tags=["webhook endpoints"])
Rt = Annotated[Runtime, Depends(runtime)]
Admin = Annotated[ApiKey, Depends(scoped("admin"))]


class EndpointIn(BaseModel):
    """A receiver to register: its URL, the event types it wants (all when left out)."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=MAX_URL)
    events: list[str] | None = Field(default=None, max_length=50)
    description: str | None = Field(default=None, max_length=endpoints.MAX_DESCRIPTION)


@router.post("/v1/webhook-endpoints", status_code=201)
def register(body: EndpointIn, key: Admin, rt: Rt) -> JSONResponse:
    """Register an endpoint -> 201 ``{id, url, events, secret}``; the secret is shown once.

    A URL whose host resolves to a loopback, private, link-local or otherwise non-public
    address is 422 ``webhook_target_refused`` unless ``MAILER_WEBHOOK_ALLOW_PRIVATE``.
    """
    events = endpoints.parse_events(body.events)
    # Resolved here, outside the transaction: a slow DNS answer holds no database lock.
    url = check_target(body.url, rt.settings.webhook_allow_private)
    with rt.engine.begin() as conn:
        registered = endpoints.create(conn, str(url), events, body.description, key.id,
                                      SecretBox.from_settings(rt.settings), rt.clock())
    shown = endpoints.view(registered.row)
    return JSONResponse({**shown, "secret": registered.secret}, status_code=201)


@router.get("/v1/webhook-endpoints")
def list_endpoints(key: Admin, rt: Rt) -> dict[str, Any]:
    """Every endpoint, oldest first, without secrets."""
    with rt.engine.connect() as conn:
        return {"items": [endpoints.view(row) for row in endpoints.live(conn)]}


@router.get("/v1/webhook-endpoints/{endpoint_id}")
def show(endpoint_id: str, key: Admin, rt: Rt) -> dict[str, Any]:
    """One endpoint with ``failing_since`` and ``last_error``; 404 when unknown or deleted."""
    with rt.engine.connect() as conn:
        return endpoints.view(endpoints.get(conn, endpoint_id))


@router.delete("/v1/webhook-endpoints/{endpoint_id}", status_code=204)
def remove(endpoint_id: str, key: Admin, rt: Rt) -> Response:
    """Delete an endpoint -> 204; what it had pending is not sent."""
    with rt.engine.begin() as conn:
        endpoints.delete(conn, endpoint_id, rt.clock())
    return Response(status_code=204)
