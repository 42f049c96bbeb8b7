"""``/docs`` served from this deployment alone, and the OpenAPI document it shows (SPEC 7).

FastAPI's default ``/docs`` page loads Swagger UI from a public CDN, which a deployment
without internet access (or with a strict Content-Security-Policy) cannot reach. The same
files ship in the ``fastapi-swagger`` package (Swagger UI 5, which reads OpenAPI 3.1), and
are served here under ``/docs/assets/``. ReDoc, which would load from a CDN too, is off.

The document gains what FastAPI cannot infer from handlers that build their JSON by hand:
the bearer scheme on every authenticated operation (from :data:`mailer.api.deps.bearer`),
the error envelope on every 4xx answer of the API (not the shape of FastAPI's own
validation errors, which :mod:`mailer.api.errors` replaces), and response models of the
main endpoints (:mod:`mailer.api.models`).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from mailer.api import models
from mailer.errors import NotFound

#: URL prefix of the Swagger UI files.
ASSETS = "/docs/assets"
#: The files served there: name -> media type (nothing else in the package is exposed).
_ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

#: Response bodies of handlers that return plain dicts: (method, path) -> (statuses, model).
DECLARED: dict[tuple[str, str], tuple[tuple[str, ...], type[BaseModel]]] = {
    ("post", "/v1/messages"): (("202",), models.MessageAccepted),
    ("post", "/v1/messages/batch"): (("202",), models.BatchResults),
    ("get", "/v1/messages/{message_id}"): (("200",), models.MessageView),
    ("put", "/v1/recipients/{external_id}"): (("200", "201"), models.RecipientProfile),
    ("get", "/v1/recipients/{external_id}"): (("200",), models.RecipientView),
    ("post", "/v1/campaigns"): (("201",), models.CampaignCreated),
    ("get", "/v1/campaigns"): (("200",), models.CampaignList),
    ("get", "/v1/campaigns/{campaign_id}"): (("200",), models.CampaignView),
}
#: Where answers are JSON and a 4xx carries the error envelope (public pages answer HTML).
_API_PREFIXES = ("/v1/", "/webhooks/", "/metrics")

_ERROR = {"$ref": "#/components/schemas/ErrorBody"}


def _schema_ref(document: dict[str, Any], model: type[BaseModel]) -> dict[str, str]:
    """Add ``model`` (and the models it uses) to the components; return a reference to it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}",
                                     mode="serialization")
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app``, completed as the module docstring says."""
    document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                           description=app.description, tags=app.openapi_tags)
    _schema_ref(document, models.ErrorBody)
    for (method, path), (statuses, model) in DECLARED.items():
        operation = document["paths"].get(path, {}).get(method)
        if operation is None:
            continue
        responses = operation.setdefault("responses", {})
        if "200" not in statuses:
            responses.pop("200", None)  # FastAPI's guess for a handler without a model
        for status in statuses:
            responses[status] = {"description": "Created" if status == "201" else "OK",
                                 "content": {"application/json": {
                                     "schema": _schema_ref(document, model)}}}
    for path, operations in document["paths"].items():
        if not path.startswith(_API_PREFIXES):
            continue
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                if status.startswith("4"):
                    response["content"] = {"application/json": {"schema": _ERROR}}
            if operation.get("security"):
                responses.setdefault("401", _error("Missing, unknown or revoked API key"))
                responses.setdefault("403", _error("The key lacks the scope"))
            responses.setdefault("4XX", _error(
                "Refused: `error.code` says why (see docs/api.md)"))
    # FastAPI's validation error shapes are never sent (mailer.api.errors answers them).
    schemas = document["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return document


#: The introduction at the top of ``/docs``.
DESCRIPTION = """\
Queue-based email dispatcher with opt-out enforcement.

**Authentication**: `Authorization: Bearer <key>` (create keys with `mailer keys create`).
A missing or revoked key is 401, a key without the scope 403.

**Errors**: every 4xx answer is `{"error": {"code", "message", "details"}}`; branch on
`code`. Lists are paged with `next_cursor`. The repository's `docs/api.md` has the rest.
"""


def install(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets locally, and the completed ``/openapi.json``."""
    app.description = DESCRIPTION

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        """The interactive API documentation, with no request leaving this deployment."""
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
            # No validator badge: it would send the document to a public validator.
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
        )

    @app.get(ASSETS + "/{name}", include_in_schema=False)
    def swagger_asset(name: str) -> Response:
        """One of the Swagger UI files of the ``fastapi-swagger`` package."""
        media_type = _ASSET_TYPES.get(name)
        if media_type is None:
            raise NotFound("no such file")
        # The files change only with the package version: a day of caching is safe.
        return Response(_asset(name), media_type=media_type,
                        headers={"Cache-Control": "public, max-age=86400"})


@functools.cache
def _asset(name: str) -> bytes:
    """A file of the package, read once per process (the script is 1.7 MB)."""
    return (resources.files("fastapi_swagger") / "resources" / name).read_bytes()
