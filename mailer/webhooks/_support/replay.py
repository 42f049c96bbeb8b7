"""One-time token stores that let a webhook source refuse a token seen before (Mailgun)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

#: Tokens kept by the in-memory store before the oldest are dropped, bounding memory.
DEFAULT_MAX_TOKENS = 100_000


class SeenTokens(Protocol):
    """Remembers tokens until they expire; the production one is backed by the database."""

    def add_if_new(self, token: str, expires_at: datetime) -> bool:
        """Record ``token`` until ``expires_at``; return False if it was already recorded."""
        ...


class MemorySeenTokens:
    """A per-process :class:`SeenTokens` for tests and single-process deployments."""

    def __init__(
        self,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        """Create an empty store; ``clock`` decides when entries have expired."""
        self._clock = clock
        self._max_tokens = max_tokens
        self._expiry: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def add_if_new(self, token: str, expires_at: datetime) -> bool:
        """Record ``token`` until ``expires_at``; return False if it is still recorded."""
        with self._lock:
            now = self._clock()
            known = self._expiry.get(token)
            if known is not None and known > now:
                return False
            self._purge(now)
            self._expiry[token] = expires_at
            return True

    def __len__(self) -> int:
        """Number of tokens currently held (expired ones included until the next purge)."""
        return len(self._expiry)

    def _purge(self, now: datetime) -> None:
        if len(self._expiry) < self._max_tokens:
            return
        self._expiry = {t: e for t, e in self._expiry.items() if e > now}
        # Still full of live tokens: drop the oldest-inserted. Their timestamps are the
        # oldest too, so they are the first to fall outside the freshness window anyway.
        while len(self._expiry) >= self._max_tokens:
            del self._expiry[next(iter(self._expiry))]
