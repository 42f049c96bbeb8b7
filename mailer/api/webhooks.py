"""``POST /webhooks/<provider>``: verify on the raw body, normalise, apply idempotently.

Only reading the body happens on the event loop. Verifying (which may fetch an SNS
certificate or record a Mailgun token), parsing (a DSN may be 5 MiB) and the database work
run in a worker thread, so one large report never stalls other requests (SPEC 7).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import insert

from mailer.api.deps import runtime
from mailer.api.errors import error_response
from mailer.reports.apply import DatabaseSeenTokens, EventApplier
from mailer.reports.intake import ReportIntake
from mailer.runtime import Runtime
from mailer.store.schema import sns_subscriptions
from mailer.webhooks import (
    BodyTooLarge,
    NotConfigured,
    ParseError,
    SnsSubscription,
    VerificationFailed,
    WebhookConfig,
    WebhookError,
    WebhookSource,
    body_limit,
    check_size,
    dsn,
    handle,
    source,
)

router = APIRouter(tags=["webhooks"])

#: Webhook requests worked on at once, each in its own thread with its own database
#: connection. Bounded apart from the shared thread pool, which also serves /healthz and
#: every synchronous route, so a burst of large reports waits for a slot here instead of
#: taking every thread; two cores gain nothing from more CPU-bound parsers at once.
MAX_CONCURRENT = 4


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The raw body, or None once it grows past ``limit`` (we stop reading there)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _config(rt: Runtime, request: Request) -> WebhookConfig:
    cached: WebhookConfig | None = getattr(request.app.state, "webhook_config", None)
    if cached is None:
        cached = WebhookConfig.from_settings(rt.settings, seen_tokens=DatabaseSeenTokens(rt))
        request.app.state.webhook_config = cached
    return cached


def _limiter(app: FastAPI) -> CapacityLimiter:
    # Made on first use, inside the running event loop, and kept for the app's life.
    limiter: CapacityLimiter | None = getattr(app.state, "webhook_limiter", None)
    if limiter is None:
        limiter = CapacityLimiter(MAX_CONCURRENT)
        app.state.webhook_limiter = limiter
    return limiter


@router.post("/webhooks/{provider}")
async def receive(
    provider: str, request: Request, rt: Annotated[Runtime, Depends(runtime)]
) -> JSONResponse:
    """Answer 200 with what was applied; 401 bad signature, 400 unparseable, 404 unknown."""
    config = _config(rt, request)
    try:
        handler = source(provider, config)
    except NotConfigured as exc:
        return error_response(404, "not_configured", str(exc))
    body = await _read_body(request, body_limit(provider))
    if body is None:
        return error_response(413, "payload_too_large", "the body is too large")
    headers = dict(request.headers)
    return await anyio.to_thread.run_sync(
        process, handler, headers, body, config, rt, limiter=_limiter(request.app)
    )


def process(
    handler: WebhookSource, headers: Mapping[str, str], body: bytes, config: WebhookConfig,
    rt: Runtime,
) -> JSONResponse:
    """Verify, parse and apply one request; blocking, so called in a worker thread."""
    try:
        if handler is dsn:
            # Raw mail: verified, then read, applied and recorded as the inbound listener
            # does (auto-replies and unreadable reports leave a record too, SPEC 4).
            check_size(body, dsn.MAX_BODY)
            dsn.verify(headers, body, config, rt.clock())
            dsn.check_mail(body)
            return JSONResponse(ReportIntake(rt).take(body, source=dsn.PROVIDER).counts())
        result = handle(handler, headers, body, config, rt.clock())
    except VerificationFailed:
        # Say nothing about which check failed: that would help a forger.
        return error_response(401, "verification_failed", "the request could not be verified")
    except BodyTooLarge:
        return error_response(413, "payload_too_large", "the body is too large")
    except ParseError as exc:
        return error_response(400, "unparseable", str(exc)[:200])
    except WebhookError as exc:
        # e.g. CertificateUnavailable is a 503, so SNS retries later.
        status = int(getattr(exc, "status", 400))
        return error_response(status, "webhook_error", str(exc)[:200])
    if isinstance(result, SnsSubscription):
        # Recorded, never visited automatically: confirming is an operator's decision.
        with rt.engine.begin() as conn:
            conn.execute(insert(sns_subscriptions).values(
                kind=result.kind, topic_arn=result.topic_arn,
                subscribe_url=result.subscribe_url, received_at=rt.clock()))
        return JSONResponse({"recorded": result.kind})
    report = EventApplier(rt).apply(result)
    return JSONResponse(report.counts())
