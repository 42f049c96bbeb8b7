"""``Client`` and ``AsyncClient``: the API's message endpoints over httpx (SPEC 1 and 7).

Both share the request bodies, the retry policy and the reading of answers; only the
waiting differs. The transport is injectable, as in httpx, so tests and callers can put
their own (a proxy, a fault injector, an in-process app) under the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from mailer.client.errors import ApiError, TransportError, error_for
from mailer.client.messages import Recipient, batch_body, message_body
from mailer.client.retry import RETRY_EXCEPTIONS, RetryPolicy
from mailer.client.signatures import verify_webhook

#: Seconds allowed to connect, and between bytes of an answer (httpx's per-phase timeout).
DEFAULT_TIMEOUT = 10.0
#: Sent as User-Agent, so the API's operators can tell this client's traffic apart.
USER_AGENT = "mailer-client/0.1"


def _read(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a 2xx answer, or the matching :class:`ApiError` raised."""
    if not response.is_success:
        raise error_for(response)
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(response.status_code, "invalid_response", "the answer is not a JSON object")
    return body


def _gave_up(method: str, path: str, attempts: int, exc: Exception,
             key: str | None) -> TransportError:
    # The exception type says enough (ReadTimeout, ConnectError); its text may hold the URL.
    return TransportError(f"{method} {path}: {type(exc).__name__} after {attempts} attempt(s)",
                          idempotency_key=key)


class _Base:
    """What both clients share: configuration, request headers and webhook checking."""

    #: Check an event webhook's signature (SPEC 13); the same as :func:`verify_webhook`.
    verify_webhook = staticmethod(verify_webhook)

    def __init__(self, api_key: str, max_retries: int | None, backoff: float | None) -> None:
        if not api_key:
            raise ValueError("an API key is required")
        defaults = RetryPolicy()
        self._policy = RetryPolicy(
            defaults.max_retries if max_retries is None else max_retries,
            defaults.backoff if backoff is None else backoff,
        )
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                         "User-Agent": USER_AGENT}

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"  # never the key


class Client(_Base):
    """A blocking client for the mailer API."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        max_retries: int | None = None,
        backoff: float | None = None,
    ) -> None:
        """Talk to the API at ``base_url`` with ``api_key``; retries as :class:`RetryPolicy`."""
        super().__init__(api_key, max_retries, backoff)
        self._http = httpx.Client(base_url=base_url, headers=self._headers, timeout=timeout,
                                  transport=transport, follow_redirects=False)

    def send(
        self,
        template: str,
        to: Recipient,
        data: Mapping[str, Any] | None = None,
        *,
        topic: str | None = None,
        idempotency_key: str | None = None,
        send_at: datetime | str | None = None,
        locale: str | None = None,
    ) -> dict[str, Any]:
        """Enqueue one message; the 202 body ``{id, status, category, reason?}``."""
        body = message_body(template, to, data, topic=topic, idempotency_key=idempotency_key,
                            send_at=send_at, locale=locale)
        return self._request("POST", "/v1/messages", body, body["idempotency_key"])

    def send_batch(self, messages: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Enqueue up to 1000 messages; ``{results: [...]}`` in input order, errors inline."""
        return self._request("POST", "/v1/messages/batch", batch_body(messages))

    def get_message(self, message_id: str) -> dict[str, Any]:
        """A message's status, attempts, SMTP response and events."""
        return self._request("GET", f"/v1/messages/{quote(message_id, safe='')}")

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None,
                 key: str | None = None) -> dict[str, Any]:
        retry = 0
        while True:  # bounded: every pass either returns, raises or spends one retry
            try:
                response = self._http.request(method, path, json=json)
            except RETRY_EXCEPTIONS as exc:
                if retry >= self._policy.max_retries:
                    raise _gave_up(method, path, retry + 1, exc, key) from exc
                time.sleep(self._policy.delay(retry))
                retry += 1
                continue
            except httpx.HTTPError as exc:
                raise _gave_up(method, path, retry + 1, exc, key) from exc
            if self._policy.should_retry(retry, response):
                response.close()
                time.sleep(self._policy.delay(retry, response))
                retry += 1
                continue
            return _read(response)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Base):
    """An asyncio client for the mailer API, with the same methods as :class:`Client`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        max_retries: int | None = None,
        backoff: float | None = None,
    ) -> None:
        """Talk to the API at ``base_url`` with ``api_key``; retries as :class:`RetryPolicy`."""
        super().__init__(api_key, max_retries, backoff)
        self._http = httpx.AsyncClient(base_url=base_url, headers=self._headers,
                                       timeout=timeout, transport=transport,
                                       follow_redirects=False)

    async def send(
        self,
        template: str,
        to: Recipient,
        data: Mapping[str, Any] | None = None,
        *,
        topic: str | None = None,
        idempotency_key: str | None = None,
        send_at: datetime | str | None = None,
        locale: str | None = None,
    ) -> dict[str, Any]:
        """Enqueue one message; the 202 body ``{id, status, category, reason?}``."""
        body = message_body(template, to, data, topic=topic, idempotency_key=idempotency_key,
                            send_at=send_at, locale=locale)
        return await self._request("POST", "/v1/messages", body, body["idempotency_key"])

    async def send_batch(self, messages: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """Enqueue up to 1000 messages; ``{results: [...]}`` in input order, errors inline."""
        return await self._request("POST", "/v1/messages/batch", batch_body(messages))

    async def get_message(self, message_id: str) -> dict[str, Any]:
        """A message's status, attempts, SMTP response and events."""
        return await self._request("GET", f"/v1/messages/{quote(message_id, safe='')}")

    async def _request(self, method: str, path: str, json: dict[str, Any] | None = None,
                       key: str | None = None) -> dict[str, Any]:
        retry = 0
        while True:  # bounded: every pass either returns, raises or spends one retry
            try:
                response = await self._http.request(method, path, json=json)
            except RETRY_EXCEPTIONS as exc:
                if retry >= self._policy.max_retries:
                    raise _gave_up(method, path, retry + 1, exc, key) from exc
                await asyncio.sleep(self._policy.delay(retry))
                retry += 1
                continue
            except httpx.HTTPError as exc:
                raise _gave_up(method, path, retry + 1, exc, key) from exc
            if self._policy.should_retry(retry, response):
                await response.aclose()
                await asyncio.sleep(self._policy.delay(retry, response))
                retry += 1
                continue
            return _read(response)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
