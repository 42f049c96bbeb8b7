"""Logs never carry addresses, tokens, keys or bodies (reliability test plan item 28)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from tests.conftest import WorkerProcess, auth, unique_email
from tests.test_send_path import register, send, wait_final


def test_a_full_flow_logs_no_personal_data(
    client: Any, keys: dict[str, str], worker: WorkerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Given a promotion to an opted-in person, delivered by the real worker
    address = unique_email("private")
    external_id = register(client, keys["recipients"], address)
    client.post(f"/v1/recipients/{external_id}/consents",
                json={"topic": "newsletter", "granted": True, "source": "signup_form",
                      "evidence": {"form": "https://example.test/f"}},
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
