"""A synchronous façade over an async transport, for dramatiq's worker threads.

One event loop runs in a daemon thread per process and drives one async transport (the
pool, or the pool behind the sending pace); worker threads submit work to it and wait.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, Protocol, TypeVar

from mailer.smtp.replies import EnvelopeLike, SendResult

_T = TypeVar("_T")


class AsyncTransport(Protocol):
    """What the façade drives: :class:`~mailer.smtp.pool.SmtpTransport` or a paced one."""

    async def send(self, envelope: EnvelopeLike) -> SendResult:
        """Run one transaction; never raises for SMTP trouble."""
        ...

    async def send_many(self, envelopes: Sequence[EnvelopeLike]) -> list[SendResult]:
        """Send them all concurrently; results in order."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


_A = TypeVar("_A", bound=AsyncTransport)


class BlockingTransport(Generic[_A]):
    """Synchronous façade: an event loop in a daemon thread driving one async transport."""

    def __init__(self, factory: Callable[[], _A]) -> None:
        # Create this in the process that uses it (after dramatiq forks its workers):
        # an event loop and its sockets do not survive fork.
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smtp-transport",
                                        daemon=True)
        self._thread.start()
        self._closed = False

        async def build() -> _A:
            return factory()

        try:
            self._transport = self._run(build())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def transport(self) -> _A:
        """The async transport this façade drives (use it only on the loop thread)."""
        return self._transport

    def send(self, envelope: EnvelopeLike) -> SendResult:
        """Send one envelope and wait for its result; callable from any thread."""
        return self._run(self._transport.send(envelope))

    def send_many(self, envelopes: Sequence[EnvelopeLike]) -> list[SendResult]:
        """Send envelopes concurrently over the pool and wait; callable from any thread."""
        return self._run(self._transport.send_many(list(envelopes)))

    def close(self) -> None:
        """Close the pooled connections and stop the loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._transport.close(), checked=False)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, _T], *, checked: bool = True) -> _T:
        if checked and self._closed:
            coro.close()
            raise RuntimeError("BlockingTransport is closed")
        if os.getpid() != self._pid:
            coro.close()
            raise RuntimeError("BlockingTransport was created before fork; make one per process")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("BlockingTransport called from its own loop thread (deadlock)")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # The caller gave up (say, dramatiq's time limit fired): stop the sends rather
            # than let them finish unrecorded, which the sweeper would turn into duplicates.
            future.cancel()
            raise
