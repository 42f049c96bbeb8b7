"""The HTTP application: FastAPI wiring of the runtime, routers and error handlers."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import select, text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailer.api import campaigns as campaigns_api
from mailer.api import docs as docs_api
from mailer.api import errors, messages, operations, public, recipients, suppressions, webhooks
from mailer.api import keys as keys_api
from mailer.api import listing as listing_api
from mailer.api import policy_versions as policy_versions_api
from mailer.api import templates as templates_api
from mailer.api import webhook_endpoints as webhook_endpoints_api
from mailer.api.deps import runtime, scoped
from mailer.config import Settings, load_or_exit
from mailer.keys import ApiKey
from mailer.runtime import Runtime
from mailer.store.schema import marketing_templates

#: Largest API request body (SPEC 7); a batch of 1000 messages fits comfortably.
MAX_BODY_BYTES = 10 * 1024 * 1024
#: Largest body posted to ``/webhooks/*`` (SPEC 7); a provider's batch or one DSN report.
MAX_WEBHOOK_BODY_BYTES = 5 * 1024 * 1024
#: Largest body posted to a public page (SPEC 7): a form of a few fields, never more.
MAX_PAGE_BODY_BYTES = 64 * 1024
_PAGE_PREFIXES = ("/u/", "/preferences/", "/confirm/")


def body_limit(path: str) -> int:
    """The largest request body accepted on ``path`` (SPEC 7)."""
    if path.startswith("/webhooks/"):
        return MAX_WEBHOOK_BODY_BYTES
    if path.startswith(_PAGE_PREFIXES):
        return MAX_PAGE_BODY_BYTES
    return MAX_BODY_BYTES


class BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive`` once a request body grows past its limit (HTTP 413)."""

    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"bodies are limited to {limit} bytes here")


class UnstorableValue(StarletteHTTPException):
    """Raised from ``receive`` when a JSON body holds a value we cannot store (HTTP 422)."""

    code = "unstorable_value"

    def __init__(self, why: str) -> None:
        super().__init__(422, why)


#: In a JSON body, tokens that may stand for a value neither the database nor a JSON
#: response can hold: NaN and the infinities (Python's json reads them, RFC 8259 has no
#: such numbers), and ``\u`` escapes of NUL (PostgreSQL text cannot hold it) or of a
#: surrogate (a lone one has no UTF-8 form). Most bodies hold none; one that does is
#: parsed once more, and refused if such a value is really there.
_SUSPECT = re.compile(rb"NaN|Infinity|\\u(?:0000|[dD][89a-fA-F])")
_SUSPECT_OVERLAP = len(b"Infinity") - 1
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


def _refuse_constant(name: str) -> Any:
    raise UnstorableValue(f"{name} is not a JSON number")


def json_problem(body: bytes) -> UnstorableValue | None:
    """Why a JSON body holds a value we cannot store, if it does.

    A body that does not parse is not our concern here: the app answers it with a 400.
    """
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
    except UnstorableValue as exc:
        return exc
    except (ValueError, RecursionError):
        return None
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _BAD_TEXT.search(item):
                return UnstorableValue("text may not hold NUL or unpaired surrogates")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _is_json(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if key == b"content-type":
            media: bytes = value.split(b";")[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


class RequestGuard:
    """Pure ASGI middleware that caps request bodies while they are read (SPEC 7).

    A declared ``Content-Length`` over the limit is refused before a byte of the body is
    read. A chunked body (or one that lies about its length) is counted as it arrives: the
    message that crosses the limit raises :class:`BodyTooLarge` inside whoever is reading,
    so at most ``limit`` bytes are ever held, and no authentication, JSON parsing or form
    parsing runs on a body that is too large. FastAPI re-raises HTTP exceptions met while
    reading a body, so the app's own handler answers with the SPEC's error body; should
    the exception escape the app instead, it is answered here.

    It also refuses, with 400, a path or query that holds NUL, and with 422 a JSON body
    (outside ``/webhooks/``, whose bodies are the providers' and are parsed there) that
    holds NaN, an infinity, NUL or a lone surrogate: each would fail later as a 500, in
    the database or in the JSON of the response, after the row was written.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request with its body counted and checked."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        limit = body_limit(scope["path"])
        checked = _is_json(scope) and not scope["path"].startswith("/webhooks/")
        chunks: list[bytes] = []
        suspect = False
        received = 0
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, suspect
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise BodyTooLarge(limit)
            if checked:
                # The same bytes objects the app keeps: holding them costs no copy.
                tail = chunks[-1][-_SUSPECT_OVERLAP:] if chunks else b""
                suspect = suspect or _SUSPECT.search(tail + chunk) is not None
                chunks.append(chunk)
                if not message.get("more_body", False):
                    body = b"".join(chunks) if suspect else b""
                    chunks.clear()
                    problem = json_problem(body) if suspect else None
                    if problem is not None:
                        raise problem
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, watched_send)
        except (BodyTooLarge, UnstorableValue) as exc:
            if started:
                raise
            await errors.error_response(exc.status_code, exc.code, str(exc.detail))(
                scope, receive, send)

    @staticmethod
    def _refusal(scope: Scope) -> JSONResponse | None:
        """The answer to a request refused on its head alone, if it is."""
        query: bytes = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            return errors.error_response(400, "bad_request", "NUL in the path or query")
        limit = body_limit(scope["path"])
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared:
            # RFC 9110 section 8.6: a Content-Length that is not one decimal number (or
            # repeats with different values) makes the framing unknowable.
            if len(set(declared)) != 1 or not declared[0].isdigit():
                return errors.error_response(400, "bad_request", "invalid Content-Length")
            if int(declared[0]) > limit:
                return errors.error_response(413, "payload_too_large",
                                             f"bodies are limited to {limit} bytes here")
        return None


class MailerApp(FastAPI):
    """The FastAPI app, which never hands the server an exception to log."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve; swallow what Starlette re-raises after the 500 handler has answered."""
        try:
            await super().__call__(scope, receive, send)
        except Exception:
            # Starlette raises the exception again once the handler has answered 500 (and
            # logged its type and place); the server would then log the whole traceback,
            # whose text may quote an address, a token or a body.
            if scope["type"] != "http":
                raise


def create_app(rt: Runtime | None = None) -> FastAPI:
    """Build the app; without a runtime, one is wired from the environment at start-up."""
    # SPEC 6: the factory (uvicorn --factory) checks the whole configuration before the
    # server starts; a bad setting exits 2 with one line on stderr.
    settings = load_or_exit() if rt is None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "runtime", None) is None:
            app.state.runtime = Runtime.from_settings(settings or Settings.from_environ())
        yield

    # /docs comes from mailer.api.docs (no CDN); ReDoc would need one, so it is off.
    app = MailerApp(title="mailer", version="0.1.0", lifespan=lifespan, docs_url=None,
                    redoc_url=None)
    app.state.runtime = rt
    errors.install(app)
    docs_api.install(app)

    # Outermost of ours, so no handler, dependency or parser sees an oversized body.
    app.add_middleware(RequestGuard)

    app.include_router(messages.router)
    app.include_router(recipients.router)
    app.include_router(operations.router)
    app.include_router(webhooks.router)
    app.include_router(suppressions.router)
    app.include_router(public.router)
    app.include_router(campaigns_api.router)
    app.include_router(templates_api.router)
    app.include_router(policy_versions_api.router)
    app.include_router(listing_api.router)
    app.include_router(keys_api.router)
    app.include_router(webhook_endpoints_api.router)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz(rt: Annotated[Runtime, Depends(runtime)]) -> JSONResponse:
        """The database, Redis and the broker (when it is not that Redis) answer."""
        checks: dict[str, str] = {}
        try:
            with rt.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        ping = getattr(rt.enqueuer, "ping", None)
        queue_ok = "ok" if ping is None or ping() else "unreachable"
        if rt.settings.broker_url == rt.settings.redis_url:
            checks["redis"] = queue_ok
        else:
            # RabbitMQ (or another Redis) holds the queue; MAILER_REDIS_URL still holds the
            # sending pace and the shared metrics, so both must answer.
            checks["broker"] = queue_ok
            try:
                checks["redis"] = "ok" if rt.redis.ping() else "unreachable"
            except Exception as exc:
                checks["redis"] = f"unreachable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                            status_code=200 if ready else 503)

    @app.get("/v1/templates", tags=["templates"])
    def list_templates(
        key: Annotated[ApiKey, Depends(scoped("marketing", "messages:transactional",
                                              "messages:legal"))],
        rt: Annotated[Runtime, Depends(runtime)],
    ) -> dict[str, Any]:
        """Every file template, then every stored marketing template."""
        listed = [
            {"name": t.name, "category": t.category.value, "topic": t.topic,
             "description": t.description, "required": list(t.required), "source": "file"}
            for t in rt.catalogue
        ]
        files = {t["name"] for t in listed}
        with rt.engine.connect() as conn:
            stored = conn.execute(
                select(marketing_templates.c.name, marketing_templates.c.category,
                       marketing_templates.c.topic, marketing_templates.c.version)
                .order_by(marketing_templates.c.name)
            )
            listed += [
                {"name": r.name, "category": r.category, "topic": r.topic, "description": "",
                 "required": [], "source": "stored", "version": r.version}
                for r in stored if r.name not in files  # a file template wins a name clash
            ]
        return {"templates": listed}

    return app
