"""The HTTP application: FastAPI wiring of the runtime, routers and error handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select, text

from mailer.api import campaigns as campaigns_api
from mailer.api import errors, messages, operations, public, recipients, suppressions, webhooks
from mailer.api import templates as templates_api
from mailer.api.deps import runtime, scoped
from mailer.config import Settings
from mailer.keys import ApiKey
from mailer.marketing_templates import install as install_stored_templates
from mailer.runtime import Runtime
from mailer.schema import marketing_templates

#: Largest request body we read; a batch of 1000 messages fits comfortably.
MAX_BODY_BYTES = 10 * 1024 * 1024


def create_app(rt: Runtime | None = None) -> FastAPI:
    """Build the app; without a runtime, one is wired from the environment at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if getattr(app.state, "runtime", None) is None:
            app.state.runtime = Runtime.from_settings(Settings.from_environ())
        # Stored marketing templates are found by name like file ones (issue 5).
        install_stored_templates(app.state.runtime)
        yield

    app = FastAPI(title="mailer", version="0.1.0", lifespan=lifespan)
    app.state.runtime = rt
    errors.install(app)

    @app.middleware("http")
    async def limit_body(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return errors.error_response(413, "payload_too_large",
                                         f"bodies are limited to {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    app.include_router(messages.router)
    app.include_router(recipients.router)
    app.include_router(operations.router)
    app.include_router(webhooks.router)
    app.include_router(suppressions.router)
    app.include_router(public.router)
    app.include_router(campaigns_api.router)
    app.include_router(templates_api.router)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz(rt: Annotated[Runtime, Depends(runtime)]) -> JSONResponse:
        """The database and Redis answer."""
        checks: dict[str, str] = {}
        try:
            with rt.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        ping = getattr(rt.enqueuer, "ping", None)
        checks["redis"] = "ok" if ping is None or ping() else "unreachable"
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
