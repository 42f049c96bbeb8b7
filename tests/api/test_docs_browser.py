"""``/docs`` renders in a real Chromium with no network beyond the API, and the OpenAPI
document declares the bearer scheme, the error envelope and the main response models."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from tests.conftest import auth, serving, unique_email
from tests.scenarios.test_preferences_browser import CHROMIUM_ARGS
from tests.services import chromium_path, require


def test_docs_render_with_every_other_host_blocked(runtime: Any, tmp_path: Path) -> None:
    require("chromium", chromium_path() is not None, "Debian's chromium is not installed")
    try:
        from playwright.sync_api import Route, sync_playwright
    except ImportError:  # pragma: no cover - depends on the machine
        require("playwright", False, "the playwright Python package is not installed")
        raise
    with serving(runtime) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            requested: list[str] = []
            blocked: list[str] = []

            # Given a browser that can reach the API and nothing else
            def only_the_api(route: Route) -> None:
                url = route.request.url
                requested.append(url)
                if url.startswith(base + "/"):
                    route.continue_()
                else:
                    blocked.append(url)
                    route.abort()

            context.route("**/*", only_the_api)
            page = context.new_page()
            # When it opens /docs
            response = page.goto(base + "/docs")
            assert response is not None and response.status == 200
            # Then Swagger UI renders the operations list from /openapi.json
            page.locator(".opblock").first.wait_for(timeout=20_000)
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            assert len(paths) >= 20
            assert {"/v1/messages", "/v1/keys", "/v1/recipients/{external_id}"} <= {
                p.replace("\u200b", "").strip() for p in paths}
            # And it offers to authorise with the bearer scheme
            assert page.locator(".auth-wrapper .authorize").is_visible()
            # And it asked nothing of any other host (nothing had to be blocked)
            assert blocked == []
            assert f"{base}/openapi.json" in requested
            assert f"{base}/docs/assets/swagger-ui-bundle.js" in requested
            shot = tmp_path / "docs.png"
            page.screenshot(path=str(shot), full_page=False)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()


def test_assets_are_served_and_nothing_else(client: Any) -> None:
    # Then the Swagger UI files come from this server, cacheable, and no other name does
    script = client.get("/docs/assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 500_000
    assert script.headers["content-type"].startswith("text/javascript")
    assert "max-age" in script.headers["cache-control"]
    assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith(
        "text/css")
    for name in ("__init__.py", "..%2F..%2Fmain.py", "index.html"):
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # And /docs names no absolute URL, and ReDoc (CDN-only) is not served
    page = client.get("/docs").text
    assert "http://" not in page and "https://" not in page
    assert client.get("/redoc").status_code == 404


def test_openapi_declares_bearer_auth_and_the_error_envelope(client: Any) -> None:
    document = client.get("/openapi.json").json()
    # Then the bearer scheme is declared and required by the authenticated operations
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    operations = {(method, path): op for path, ops in document["paths"].items()
                  for method, op in ops.items()}
    for key in [("post", "/v1/messages"), ("get", "/v1/messages"), ("get", "/v1/keys"),
                ("delete", "/v1/keys/{key_id}"), ("get", "/v1/recipients")]:
        assert operations[key]["security"] == [{"bearer": []}], key
    # And the public and operations endpoints are not marked as needing a key
    for key in [("get", "/healthz"), ("post", "/webhooks/{provider}"), ("get", "/u/{token}")]:
        assert "security" not in operations[key], key
    # And every 4xx answer of the API is the error envelope, FastAPI's own shape is gone
    envelope = {"$ref": "#/components/schemas/ErrorBody"}
    for (method, path), op in operations.items():
        if not path.startswith(("/v1/", "/webhooks/", "/metrics")):
            continue
        for status, answer in op["responses"].items():
            if status.startswith("4"):
                assert answer["content"]["application/json"]["schema"] == envelope, (
                    method, path, status)
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    error = schemas["ErrorDetail"]
    assert set(error["properties"]) == {"code", "message", "details"}
    assert schemas["ErrorBody"]["required"] == ["error"]


def declared_model(document: dict[str, Any], method: str, path: str, status: str) -> Any:
    """The pydantic model whose schema the document names for this answer."""
    from mailer.api import models

    ref = document["paths"][path][method]["responses"][status]["content"][
        "application/json"]["schema"]["$ref"]
    return getattr(models, ref.rsplit("/", 1)[-1])


def test_declared_response_models_match_real_responses(
    client: Any, keys: dict[str, str]
) -> None:
    document = client.get("/openapi.json").json()

    def check(method: str, path: str, status: str, response: Any) -> dict[str, Any]:
        assert response.status_code == int(status), response.text
        declared_model(document, method, path, status).model_validate(response.json())
        body: dict[str, Any] = response.json()
        return body

    # Given real calls of the main endpoints, Then each answer validates against the
    # model the document declares for it
    address = unique_email("openapi")
    sent = check("post", "/v1/messages", "202", client.post(
        "/v1/messages", headers=auth(keys["transactional"]), json={
            "template": "registration_confirmation", "to": address,
            "data": {"name": "O", "confirm_url": "https://example.test/c"}}))
    check("post", "/v1/messages/batch", "202", client.post(
        "/v1/messages/batch", headers=auth(keys["transactional"]), json={"messages": [
            {"template": "registration_confirmation", "to": unique_email("openapi"),
             "data": {"name": "O", "confirm_url": "https://example.test/c"}},
            {"template": "no_such_template", "to": address}]}))
    check("get", "/v1/messages/{message_id}", "200",
          client.get(f"/v1/messages/{sent['id']}", headers=auth(keys["transactional"])))
    check("get", "/v1/messages", "200",
          client.get("/v1/messages", headers=auth(keys["admin"]), params={"to": address}))
    external_id = f"openapi-{uuid.uuid4().hex[:8]}"
    for status in ("201", "200"):  # created, then updated
        check("put", "/v1/recipients/{external_id}", status, client.put(
            f"/v1/recipients/{external_id}", headers=auth(keys["recipients"]),
            json={"email": address}))
    check("get", "/v1/recipients/{external_id}", "200", client.get(
        f"/v1/recipients/{external_id}", headers=auth(keys["recipients"])))
    check("get", "/v1/recipients", "200", client.get(
        "/v1/recipients", headers=auth(keys["recipients"]), params={"email": address}))
    check("get", "/v1/campaigns", "200",
          client.get("/v1/campaigns", headers=auth(keys["marketing"])))
    check("get", "/v1/keys", "200", client.get("/v1/keys", headers=auth(keys["admin"])))
    # And an error answer is the envelope the document declares
    from mailer.api.models import ErrorBody

    ErrorBody.model_validate(client.get("/v1/keys").json())
