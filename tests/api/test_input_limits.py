"""Request bodies over the limit are refused while they are read (SPEC 7).

10 MiB for the API, 5 MiB for webhooks, 64 KiB for public pages; ``Content-Length`` or
chunked; with or without a valid key. The ASGI-level tests count how much of the body the
app pulled before answering; the last test streams 50 MB to a real uvicorn process and
measures that process's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DSN_TOKEN, ROOT, auth, unique_email, wait_for
from tests.services import free_port

MiB = 1024 * 1024
CHUNK = 64 * 1024
#: (path prefix, limit) of SPEC 7.
LIMITS = {"api": 10 * MiB, "webhooks": 5 * MiB, "pages": 64 * 1024}


def asgi_post(app: Any, path: str, headers: dict[str, str], total: int,
              chunk: int = CHUNK) -> tuple[int, dict[str, Any], int]:
    """POST ``total`` bytes in ``chunk``-sized ASGI messages; return (status, body, pulled).

    ``pulled`` is how many body bytes the app asked for before it answered: the proof
    that the limit is enforced while reading, not after.
    """
    pulled = 0
    sent: list[dict[str, Any]] = []
    piece = b" " * chunk

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled >= total:
            await asyncio.sleep(3600)  # the client has nothing more to say
        size = min(chunk, total - pulled)
        pulled += size
        return {"type": "http.request", "body": piece[:size], "more_body": pulled < total}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=60))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body) if body.startswith(b"{") else {}, pulled


@pytest.fixture(scope="module")
def app(runtime: Any) -> Any:
    """The real ASGI app, called directly."""
    from mailer.api.app import create_app

    return create_app(runtime)


@pytest.fixture(scope="module")
def page_token(client: Any, runtime: Any) -> str:
    """A valid unsubscribe token, so the page reads the body it is sent."""
    from mailer.keys import create_key
    from mailer.store.recipients import get_recipient

    with runtime.engine.begin() as conn:
        key = create_key(conn, "limits-recipients", ["recipients"])
    external_id = f"limits-{uuid.uuid4().hex[:8]}"
    r = client.put(f"/v1/recipients/{external_id}", json={"email": unique_email("limits")},
                   headers=auth(key))
    assert r.status_code == 201, r.text
    with runtime.engine.connect() as conn:
        row = get_recipient(conn, external_id)
    token: str = runtime.signer.sign("u", row.id, "newsletter", row.email_hash)
    return token


def _targets(keys: dict[str, str], page_token: str) -> dict[str, tuple[str, dict[str, str]]]:
    return {
        "api": ("/v1/messages/batch", {"content-type": "application/json"}),
        "webhooks": ("/webhooks/dsn", {"content-type": "message/rfc822"}),
        "pages": (f"/u/{page_token}", {"content-type": "application/x-www-form-urlencoded"}),
    }


@pytest.mark.parametrize("where", ["api", "webhooks", "pages"])
@pytest.mark.parametrize("credential", ["valid", "missing", "wrong"])
def test_chunked_bodies_over_the_limit_are_cut_off_while_read(
    app: Any, keys: dict[str, str], page_token: str, where: str, credential: str
) -> None:
    # Given a chunked body (no Content-Length) five times the limit of its endpoint
    limit = LIMITS[where]
    path, headers = _targets(keys, page_token)[where]
    secret = {"api": auth(keys["transactional"]), "webhooks": auth(DSN_TOKEN),
              "pages": {}}[where]
    if credential == "valid":
        headers = {**headers, **secret}
    elif credential == "wrong":
        headers = {**headers, **auth("not-the-key-0123456789")}
    # When it is posted
    status, body, pulled = asgi_post(app, path, headers, total=5 * limit)
    # Then it is a 413 in the SPEC's shape, whoever sent it
    assert status == 413, body
    assert body["error"]["code"] == "payload_too_large"
    assert set(body["error"]) == {"code", "message", "details"}
    # And reading stopped at the chunk that crossed the limit
    assert limit < pulled <= limit + CHUNK


@pytest.mark.parametrize("where", ["api", "webhooks", "pages"])
def test_a_declared_length_over_the_limit_is_refused_unread(
    app: Any, keys: dict[str, str], page_token: str, where: str
) -> None:
    # Given a Content-Length one byte over the limit
    limit = LIMITS[where]
    path, headers = _targets(keys, page_token)[where]
    headers = {**headers, "content-length": str(limit + 1)}
    # When it is posted, Then it is a 413 before a byte of the body is read
    status, body, pulled = asgi_post(app, path, headers, total=limit + 1)
    assert (status, body["error"]["code"], pulled) == (413, "payload_too_large", 0)


def test_a_body_at_the_limit_is_read_and_answered_on_its_merits(
    app: Any, keys: dict[str, str]
) -> None:
    # Given an API body of exactly 10 MiB (of spaces: not JSON)
    status, body, pulled = asgi_post(app, "/v1/messages/batch",
                                     {"content-type": "application/json",
                                      **auth(keys["transactional"])}, total=LIMITS["api"])
    # Then it is read whole and refused for what it is, not for its size
    assert pulled == LIMITS["api"]
    assert status == 400 and body["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("declared", ["12abc", "-1", "", "1e3"])
def test_a_malformed_content_length_is_a_400_unread(app: Any, declared: str) -> None:
    # Given a Content-Length that is not one decimal number (RFC 9110 section 8.6)
    status, body, pulled = asgi_post(app, "/v1/messages", {"content-length": declared},
                                     total=10)
    # Then the framing is unknowable: 400, and nothing of the body is read
    assert (status, body["error"]["code"], pulled) == (400, "bad_request", 0)


def test_the_test_client_sees_the_same_413(client: Any, keys: dict[str, str]) -> None:
    # Given an 11 MiB chunked body sent through the HTTP test client, with a valid key
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": ['
        for _ in range(11 * MiB // CHUNK):
            yield b" " * CHUNK
    r = client.post("/v1/messages/batch", content=chunks(),
                    headers={**auth(keys["transactional"]), "Content-Type": "application/json"})
    # Then the answer is the SPEC's 413
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


# --- a real server ------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid``, in KiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def _read_status(sock: socket.socket, deadline: float) -> int | None:
    data = b""
    while b"\r\n" not in data and time.monotonic() < deadline:
        try:
            got = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not got:
            break
        data += got
    line = data.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None


def post(port: int, path: str, headers: dict[str, str], body: bytes) -> int | None:
    """One plain request with a Content-Length; its status."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        return _read_status(sock, time.monotonic() + 10)


def stream_chunked(port: int, path: str, headers: dict[str, str], total: int,
                   timeout: float = 60.0) -> tuple[int | None, int]:
    """Stream ``total`` bytes chunked to 127.0.0.1:``port``; stop when the server answers.

    Returns the status (None if the connection closed first) and how many bytes were sent.
    """
    deadline = time.monotonic() + timeout
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Transfer-Encoding: chunked",
            *(f"{k}: {v}" for k, v in headers.items())]
    piece = b'{"template":"registration_confirmation","to":"a@example.org"},' * 1000
    frame = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent = 0
    opening = b'{"messages": ['
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode()
                     + b"%x\r\n" % len(opening) + opening + b"\r\n")
        for _ in range(total // len(piece) + 1):  # bounded in count, and in time below
            readable, _, _ = select.select([sock], [], [], 0)
            if readable or sent >= total or time.monotonic() > deadline:
                break
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        return _read_status(sock, deadline), sent


@pytest.fixture()
def api_process(env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """``uvicorn`` serving the real app in a subprocess on a free loopback port."""
    port = free_port()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "mailer.api.app:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
            cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            stdout=devnull, stderr=devnull, start_new_session=True)
    try:
        def healthy() -> bool:
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                return _read_status(sock, time.monotonic() + 2) == 200
            return False
        wait_for(healthy, timeout=30)
        yield proc.pid, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_a_50_mb_chunked_batch_does_not_grow_the_api(
    api_process: tuple[int, int], keys: dict[str, str]
) -> None:
    pid, port = api_process
    key = auth(keys["transactional"])
    # Given the API warmed up by one small batch
    small = {"messages": [{"template": "registration_confirmation", "to": unique_email("rss"),
                           "data": {"name": "A", "confirm_url": "https://example.test/c"}}]}
    assert post(port, "/v1/messages/batch", {**key, "Content-Type": "application/json"},
                json.dumps(small).encode()) == 202
    before = memory_kib(pid)
    # When 50 MB are streamed chunked to the batch endpoint, with a valid key and without
    results = [stream_chunked(port, "/v1/messages/batch", {**headers,
                              "Content-Type": "application/json"}, total=50_000_000)
               for headers in (key, {})]
    after = memory_kib(pid)
    grown = (after["VmHWM"] - before["VmHWM"]) / 1024
    print(f"\nAPI process {pid}: before VmRSS {before['VmRSS'] / 1024:.1f} MiB "
          f"VmHWM {before['VmHWM'] / 1024:.1f} MiB; after VmRSS {after['VmRSS'] / 1024:.1f} "
          f"MiB VmHWM {after['VmHWM'] / 1024:.1f} MiB; peak grew {grown:.1f} MiB; "
          f"sent {[sent for _, sent in results]} bytes before the answer")
    # Then each is a 413, answered long before the 50 MB were sent
    for answer, sent in results:
        assert answer == 413
        assert sent < 20_000_000
    # And the process's peak memory grew by less than 30 MiB (it holds at most 10 MiB)
    assert grown < 30
