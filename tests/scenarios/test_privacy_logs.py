"""Logs never carry addresses, tokens, keys or bodies (logs hold no personal data)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from tests.conftest import WorkerProcess, auth, unique_email
from tests.scenarios.test_send_path import register, send, wait_final


def test_a_full_flow_logs_no_personal_data(
    client: Any, keys: dict[str, str], worker: WorkerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Given a promotion to an opted-in person, delivered by the real worker
    address = unique_email("private")
    external_id = register(client, keys["recipients"], address)
    client.post(f"/v1/recipients/{external_id}/consents",
                json={"topic": "newsletter", "granted": True, "source": "signup_form",
                      "evidence": {"form": "https://example.test/f", "ip": "192.0.2.1"}},
                headers=auth(keys["recipients"]))
    body_marker = "secret-body-marker-7f3a"
    sent = send(client, keys["marketing"], template="newsletter",
                to={"email": address, "external_id": external_id},
                data={"name": "Ada", "headline": "H", "body": body_marker})
    final = wait_final(client, keys["marketing"], sent.json()["id"])
    assert final["status"] == "sent"
    # And a bad request that names the address
    client.post("/v1/messages", json={"template": "nope", "to": address},
                headers=auth(keys["marketing"]))

    # Then neither the API's logs nor the worker's output contain any of it
    # (Not ours: aiosmtpd's "mail.log" is the test's relay logging SMTP commands, and
    # "httpx" is the test client logging the URLs it calls.)
    api_logs = "\n".join(
        f"{r.name} {r.getMessage()}" for r in caplog.records
        if not r.name.startswith(("mail.log", "httpx"))
    )
    assert api_logs, "nothing was logged in-process: the check would be empty"
    worker_logs = worker.log_text()
    assert worker_logs, "the worker wrote nothing at all: the check would be empty"
    for text in (api_logs, worker_logs):
        assert address not in text
        assert address.split("@")[0] not in text
        assert body_marker not in text
        assert keys["marketing"] not in text
        assert not re.search(r"/u/[A-Za-z0-9_.-]{20,}", text), "an unsubscribe token leaked"


def test_an_unexpected_error_is_logged_without_its_text(
    runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    from mailer.api.app import create_app

    # Given a route that fails the way a database error does: quoting the address
    address = unique_email("crash")
    app = create_app(runtime)

    @app.get("/crash/{email}")
    def crash(email: str) -> None:
        raise RuntimeError(f"value too long: parameters {{'to_email': '{email}'}}")

    caplog.set_level(logging.DEBUG)
    # (the test client raises whatever the app hands on to the server)
    with TestClient(app) as test_client:
        r = test_client.get(f"/crash/{address}")
    # Then the caller gets the SPEC's 500 body, and nothing is handed on for the server
    # to log with its traceback
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    # And the log says what failed and where, but neither the exception's text nor the
    # path, both of which hold the address
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records
                       if not r.name.startswith("httpx"))
    assert "unhandled RuntimeError in GET /crash/{email}" in logged
    assert "test_privacy_logs.py" in logged
    assert address not in logged and address.split("@")[0] not in logged
    assert not any(r.exc_info for r in caplog.records), "a traceback carries the text"


def test_late_input_errors_are_422s_that_echo_nothing(
    runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient
    from pydantic import BaseModel, Field
    from sqlalchemy.exc import DataError

    from mailer.api.app import create_app

    class Box(BaseModel):
        email: str = Field(max_length=10)

    # Given routes that meet caller input too late for FastAPI's own validation: a model
    # built inside the handler, and a value the database refuses (quoting its parameters)
    address = unique_email("late")
    app = create_app(runtime)

    @app.get("/model/{email}")
    def model(email: str) -> None:
        Box(email=email)

    @app.get("/database/{email}")
    def database(email: str) -> None:
        raise DataError("INSERT INTO messages ...", {"to_email": email},
                        ValueError(f"value too long: {email}"))

    caplog.set_level(logging.DEBUG)
    with TestClient(app) as test_client:
        modelled = test_client.get(f"/model/{address}")
        stored = test_client.get(f"/database/{address}")
    # Then both are 422s in the SPEC's shape, not 500s
    assert (modelled.status_code, modelled.json()["error"]["code"]) == (422, "validation_error")
    assert (stored.status_code, stored.json()["error"]["code"]) == (422, "unstorable_value")
    # And neither the bodies nor the logs repeat the address
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    for text in (modelled.text, stored.text, logged):
        assert address not in text and address.split("@")[0] not in text
