"""``/v1/campaigns``: schedule, watch, pause, resume and cancel campaigns (SPEC 7, 9)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mailer.api.deps import runtime, scoped
from mailer.campaigns import lifecycle as model
from mailer.campaigns.audience import AudienceFilter, eligibility
from mailer.campaigns.lifecycle import CampaignStatus
from mailer.errors import TemplateError, ValidationFailed
from mailer.keys import ApiKey
from mailer.mail.stored import PROFILE_VARIABLES, StoredTemplate
from mailer.mail.templates import Template
from mailer.runtime import Runtime
from mailer.sending.compliance import require_postal_address
from mailer.store.recipients import topic_row
from suppression.policy import Category

router = APIRouter(prefix="/v1/campaigns", tags=["campaigns"])

MarketingKey = Annotated[ApiKey, Depends(scoped("marketing"))]
Rt = Annotated[Runtime, Depends(runtime)]

#: Largest shared ``data`` object, as compact JSON; it is merged into every message.
MAX_DATA_BYTES = 64 * 1024
#: Ids re-enqueued per page on resume.
_REQUEUE_PAGE = 1000


class CampaignIn(BaseModel):
    """A campaign to schedule; no ``send_at`` means now."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    template: str = Field(min_length=1, max_length=100)
    topic: str = Field(min_length=1, max_length=100)
    data: dict[str, Any] = Field(default_factory=dict)
    audience: dict[str, Any] | None = None
    send_at: datetime | None = None
    rate_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)


class _SampleAttributes(dict[str, Any]):
    """Attributes of nobody in particular: every key reads as an empty string."""

    def __missing__(self, key: str) -> str:
        return ""


def _encoded_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (campaign data is stored once, but bounded)."""
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


def _check_renders(template: Template, data: dict[str, Any]) -> None:
    """Refuse now what would fail for every recipient later (a missing shared variable)."""
    if not isinstance(template, StoredTemplate):
        missing = sorted(set(template.required) - set(data) - PROFILE_VARIABLES)
        if missing:
            raise TemplateError(f"template {template.name!r} needs data: {', '.join(missing)}",
                                details={"missing": missing}, code="missing_variable")
    sample = {"name": "Recipient", "email": "recipient@example.com",
              "attributes": _SampleAttributes(), **data}
    for version in template.versions():  # each recipient gets their language's (SPEC 14)
        version.render(sample)


@router.post("", status_code=201)
def create_campaign(body: CampaignIn, key: MarketingKey, rt: Rt) -> JSONResponse:
    """Schedule a campaign: 201 ``{id, status}``."""
    template = rt.catalogue.get(body.template)
    if template.category is not Category.PROMOTION:
        raise ValidationFailed("campaigns send promotions only", code="not_a_promotion")
    if template.topic is not None and template.topic != body.topic:
        raise ValidationFailed(f"template {template.name!r} belongs to topic {template.topic!r}",
                               code="topic_mismatch")
    require_postal_address(rt.settings.postal_address)
    if _encoded_size(body.data) > MAX_DATA_BYTES:
        raise ValidationFailed(f"data is limited to {MAX_DATA_BYTES} bytes as JSON")
    audience = AudienceFilter.parse(body.audience)
    send_at = body.send_at
    if send_at is not None and send_at.tzinfo is None:
        raise ValidationFailed("send_at needs a time zone, e.g. 2030-01-01T09:00:00Z")
    _check_renders(template, body.data)
    now = rt.clock()
    new = model.NewCampaign(
        name=body.name, template=template.name, topic=body.topic, data=body.data,
        audience=audience.as_json(),
        send_at=send_at.astimezone(UTC) if send_at else now,
        rate_per_minute=body.rate_per_minute,
    )
    with rt.engine.begin() as conn:
        topic_row(conn, body.topic)
        campaign_id = model.create(conn, new, key.id, now)
    return JSONResponse({"id": campaign_id, "status": CampaignStatus.SCHEDULED.value},
                        status_code=201)


@router.get("")
def list_campaigns(
    key: MarketingKey, rt: Rt,
    status: Annotated[str | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> dict[str, Any]:
    """The newest campaigns with their counts."""
    with rt.engine.connect() as conn:
        rows = model.recent(conn, limit, status)
        counted = model.counts(conn, rows)
    return {"campaigns": [model.view(r, counted[r.id]) for r in rows]}


def _show(rt: Runtime, campaign_id: str) -> dict[str, Any]:
    with rt.engine.connect() as conn:
        row = model.get(conn, campaign_id)
        return model.view(row, model.counts(conn, [row])[row.id])


@router.get("/{campaign_id}")
def get_campaign(campaign_id: str, key: MarketingKey, rt: Rt) -> dict[str, Any]:
    """Status and counts, live while it runs."""
    return _show(rt, campaign_id)


@router.post("/{campaign_id}/pause")
def pause_campaign(campaign_id: str, key: MarketingKey, rt: Rt) -> dict[str, Any]:
    """Stop the fan-out and hold every message not yet handed to SMTP."""
    with rt.engine.begin() as conn:
        model.pause(conn, campaign_id, rt.clock())
    return _show(rt, campaign_id)


@router.post("/{campaign_id}/resume")
def resume_campaign(campaign_id: str, key: MarketingKey, rt: Rt) -> dict[str, Any]:
    """Release held messages and continue the fan-out (or start a late campaign)."""
    with rt.engine.begin() as conn:
        released = model.resume(conn, campaign_id, rt.clock())
    if released:
        # After commit, as for any accepted message (SPEC 5); a lost enqueue is swept.
        with rt.engine.connect() as conn:
            for ids in model.queued_ids(conn, campaign_id, _REQUEUE_PAGE):
                rt.enqueuer.enqueue(ids)
    return _show(rt, campaign_id)


@router.post("/{campaign_id}/cancel")
def cancel_campaign(campaign_id: str, key: MarketingKey, rt: Rt) -> dict[str, Any]:
    """End the campaign; messages not yet handed to SMTP become ``cancelled``."""
    with rt.engine.begin() as conn:
        model.cancel(conn, campaign_id, rt.clock())
    return _show(rt, campaign_id)


@router.get("/{campaign_id}/audience")
def audience(campaign_id: str, key: MarketingKey, rt: Rt) -> dict[str, Any]:
    """How many would receive it if it were sent now, and why the others would not."""
    with rt.engine.connect() as conn:
        row = model.get(conn, campaign_id)
    found = eligibility(rt, row)
    return {"id": campaign_id, "audience": found.audience, "eligible": found.eligible,
            "excluded": found.excluded}
