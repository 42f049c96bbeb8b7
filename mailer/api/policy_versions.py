"""``/v1/policy-versions``: register privacy-policy versions and notify people (SPEC 14).

Registering a version is bookkeeping, not a change of anyone's mind: it writes one row, and
from its ``effective_at`` on, new consent events record it. It never grants, revokes or
suppresses anything (SPEC 3: "A policy-version change never alters anyone's preferences").

With ``notify: true`` the shipped ``policy_update`` template goes to every recipient with an
active account, in their language and with a link to their preference centre (the seed's
"opportunity to opt-out"), as a campaign of the ``service_alert`` category: the policy of
SPEC 2 still applies to each person (hard bounce, manual block, complaint, frequency cap),
and the counts and progress are those of any campaign (``GET /v1/campaigns/{id}``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mailer.api.deps import runtime, scoped
from mailer.campaigns import lifecycle
from mailer.errors import ValidationFailed
from mailer.keys import ApiKey
from mailer.runtime import Runtime
from mailer.store.policy_versions import PolicyVersion, listing, register, set_campaign
from mailer.times import iso
from suppression.policy import Category

router = APIRouter(prefix="/v1/policy-versions", tags=["policy versions"])

Rt = Annotated[Runtime, Depends(runtime)]

#: The shipped template of the notice (SPEC 14).
POLICY_UPDATE_TEMPLATE = "policy_update"
#: Version names: one line of printable text, as recorded in every consent event.
_VERSION = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]{1,40}")


class PolicyVersionIn(BaseModel):
    """A version of the privacy policy and when it takes effect."""

    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, max_length=40)
    effective_at: datetime
    summary_url: str | None = Field(default=None, max_length=2000)
    notify: bool = False


def _view(item: PolicyVersion) -> dict[str, Any]:
    return {"version": item.version, "effective_at": iso(item.effective_at),
            "active_consents": item.active_consents, "summary_url": item.summary_url,
            "campaign_id": item.campaign_id}


def _check(body: PolicyVersionIn) -> tuple[str, datetime]:
    """The version and its UTC effective time; 422 for anything that may not be stored."""
    version = body.version
    if version != version.strip() or not _VERSION.fullmatch(version):
        raise ValidationFailed("version must be one line of printable text, without "
                               "leading or trailing spaces", code="invalid_version")
    if body.effective_at.tzinfo is None:
        raise ValidationFailed("effective_at needs a time zone, e.g. 2030-01-01T00:00:00Z")
    try:
        effective_at = body.effective_at.astimezone(UTC)
    except OverflowError:
        raise ValidationFailed("effective_at is out of range") from None
    if body.summary_url is not None:
        parts = urlsplit(body.summary_url)
        if parts.scheme not in ("https", "http") or not parts.netloc or \
                re.search(r"[\s\x00-\x1f\x7f]", body.summary_url):
            raise ValidationFailed("summary_url must be an http(s) URL",
                                   code="invalid_summary_url")
    return version, effective_at


@router.post("", status_code=201)
def post_policy_version(
    body: PolicyVersionIn, key: Annotated[ApiKey, Depends(scoped("admin"))], rt: Rt
) -> JSONResponse:
    """Register a version: 201 ``{version, effective_at, summary_url, campaign_id}``;
    409 ``policy_version_exists`` when the name is taken."""
    version, effective_at = _check(body)
    now = rt.clock()
    if body.notify:
        template = rt.catalogue.get(POLICY_UPDATE_TEMPLATE)
        if template.category is not Category.SERVICE_ALERT:  # a deployment's own copy
            raise ValidationFailed(f"the {POLICY_UPDATE_TEMPLATE} template must be a "
                                   "service_alert", code="invalid_template")
    campaign_id: str | None = None
    # One transaction: the version and its notice exist together or not at all.
    with rt.engine.begin() as conn:
        row = register(conn, version, effective_at, body.summary_url, key.id, now)
        if body.notify:
            campaign_id = lifecycle.create(conn, lifecycle.NewCampaign(
                name=f"Privacy policy {version}", template=POLICY_UPDATE_TEMPLATE, topic=None,
                category=Category.SERVICE_ALERT, send_at=now,
                # Sent at registration, whatever effective_at (SPEC 14); the scheduler
                # starts it like any campaign due now.
                data={"version": version, "effective_at": iso(effective_at),
                      "summary_url": body.summary_url},
                audience={"account_active": True},
            ), key.id, now)
            set_campaign(conn, version, campaign_id)
    answer = {"version": row.version, "effective_at": iso(row.effective_at),
              "summary_url": row.summary_url, "campaign_id": campaign_id}
    return JSONResponse(answer, status_code=201)


@router.get("")
def list_policy_versions(
    key: Annotated[ApiKey, Depends(scoped("admin", "recipients"))], rt: Rt
) -> dict[str, Any]:
    """Every version, oldest first, with the active consents given under each."""
    with rt.engine.connect() as conn:
        items = listing(conn, rt.settings.policy_version)
    return {"items": [_view(item) for item in items]}
