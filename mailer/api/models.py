"""Response bodies of the main endpoints, as the OpenAPI document declares them (SPEC 7).

Times are ISO 8601 strings in UTC (``mailer.times.iso``). The view models allow extra
fields: they document what a response holds at least, and a field added to a handler
never disappears from the response because a model here was not updated.
``tests/api/test_docs_browser.py`` checks real responses against them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _View(BaseModel):
    """A response body: at least these fields."""

    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``code`` to branch on, a sentence, and details."""

    code: str = Field(examples=["validation_error"])
    message: str = Field(examples=["the request does not match the schema"])
    details: Any = None


class ErrorBody(BaseModel):
    """Every 4xx answer (SPEC 7): ``{"error": {"code", "message", "details"}}``."""

    error: ErrorDetail


class MessageAccepted(_View):
    """``POST /v1/messages`` (202): the new message's id and where it stands."""

    id: str
    status: str = Field(description="queued, scheduled or suppressed")
    category: str
    reason: str | None = Field(default=None, description="why it was suppressed")


class BatchError(BaseModel):
    """One refused message of a batch."""

    error: ErrorDetail


class BatchResults(BaseModel):
    """``POST /v1/messages/batch`` (202): one result per message, in input order."""

    results: list[MessageAccepted | BatchError]


class MessageEvent(_View):
    """One entry of a message's history."""

    at: str | None
    type: str
    detail: str | None


class MessageSummary(_View):
    """A message without its history, as ``GET /v1/messages`` lists it."""

    id: str
    category: str
    template: str
    topic: str | None
    status: str
    reason: str | None
    attempts: int
    created_at: str | None
    sent_at: str | None
    send_at: str | None = None
    smtp_response: str | None
    smtp_code: int | None = None
    message_id: str | None = Field(default=None, description="the RFC 5322 Message-ID")
    campaign_id: str | None = None


class MessageView(MessageSummary):
    """``GET /v1/messages/{id}``: the message and its history."""

    events: list[MessageEvent]


class MessagePage(BaseModel):
    """``GET /v1/messages``: newest first; ``next_cursor`` is null on the last page."""

    items: list[MessageSummary]
    next_cursor: str | None


class TopicPreference(_View):
    """Whether the recipient is subscribed to a topic, since when and how."""

    subscribed: bool
    since: str | None
    source: str | None


class SuppressionView(_View):
    """One suppression of the recipient's address."""

    scope: str
    reason: str
    source: str
    created_at: str | None
    expires_at: str | None


class ConsentView(_View):
    """One entry of the consent ledger (SPEC 3)."""

    id: int
    topic: str
    granted: bool
    source: str
    policy_version: str
    occurred_at: str | None
    recorded_at: str | None
    evidence: dict[str, Any] | None


class RecipientProfile(_View):
    """``PUT /v1/recipients/{external_id}``: the stored profile."""

    external_id: str
    email: str | None
    name: str | None
    locale: str | None
    attributes: dict[str, Any]
    account_active: bool
    created_at: str | None
    updated_at: str | None


class RecipientView(RecipientProfile):
    """``GET /v1/recipients/{external_id}``: profile, preferences, suppressions, ledger."""

    preferences: dict[str, TopicPreference]
    third_party_sharing: TopicPreference
    suppressions: list[SuppressionView]
    consents: list[ConsentView]


class CampaignCreated(_View):
    """``POST /v1/campaigns`` (201)."""

    id: str
    status: str


class CampaignView(_View):
    """``GET /v1/campaigns/{id}``: state and counts, never an address."""

    id: str
    name: str
    status: str = Field(description="scheduled, running, paused, cancelled or completed")
    template: str
    topic: str
    send_at: str | None
    counts: dict[str, int]


class CampaignList(BaseModel):
    """``GET /v1/campaigns``."""

    campaigns: list[CampaignView]


class KeyView(BaseModel):
    """An API key as operators see it: never the key nor its hash."""

    id: int
    name: str
    scopes: list[str]
    created_at: str | None
    last_used_at: str | None = Field(description="to the minute; null if never seen")
    revoked_at: str | None


class KeyList(BaseModel):
    """``GET /v1/keys``."""

    items: list[KeyView]
