"""When and how long the client waits before trying a request again.

Only answers that say nothing about whether the request was processed, or that a gateway
gave on the API's behalf, are retried: connection errors, timeouts, 502, 503 and 504. Any
other status is the API's verdict on the request and is final. Sends are safe to repeat
because every attempt of one send carries the same idempotency key (SPEC 5).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

from mailer.client.errors import retry_after

#: Statuses a proxy or a restarting API gives; the request may be tried again.
RETRY_STATUSES = frozenset({502, 503, 504})
#: Failures before any answer: connect/read/write/pool timeouts, refused or reset
#: connections, a peer that closed mid-response. Not retried: protocol misuse on our side.
RETRY_EXCEPTIONS: tuple[type[Exception], ...] = (
    httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError,
)
#: Retries after the first attempt.
DEFAULT_MAX_RETRIES = 3
#: First wait (seconds); it doubles on each retry.
DEFAULT_BACKOFF = 0.5
#: Longest single wait (seconds), whatever the attempt count or ``Retry-After``.
MAX_BACKOFF = 8.0


@dataclass(frozen=True)
class RetryPolicy:
    """How many times to retry and how long to wait in between."""

    max_retries: int = DEFAULT_MAX_RETRIES
    backoff: float = DEFAULT_BACKOFF

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0:
            raise ValueError("max_retries and backoff must not be negative")

    def delay(self, retry: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        base = min(self.backoff * 2.0**retry, MAX_BACKOFF)
        # Half fixed, half random: clients that failed together do not retry together.
        wait = base / 2 + random.uniform(0, base / 2)
        asked = retry_after(response) if response is not None else None
        if asked is not None:
            wait = max(wait, min(asked, MAX_BACKOFF))
        return wait

    def should_retry(self, retry: int, response: httpx.Response) -> bool:
        """Whether ``response`` to attempt ``retry`` (0-based) calls for another attempt."""
        return retry < self.max_retries and response.status_code in RETRY_STATUSES
