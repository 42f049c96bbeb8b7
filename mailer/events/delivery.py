"""Delivering event webhooks from the outbox: claim, sign, post, record (SPEC 13).

Run by the scheduler's delivery thread, never inside an API request. One pass:

1. **Claim** due deliveries of endpoints that are not backing off, at most
   :data:`PER_ENDPOINT` per endpoint, by compare-and-set: their ``next_attempt_at`` moves
   ahead by a lease. Two schedulers never both claim a row, and a scheduler killed
   mid-request leaves its rows due again once the lease runs out (at least once).
2. **Post** each endpoint's deliveries in order, endpoints concurrently. The target is
   resolved and checked (:mod:`mailer.events.targets`) and the connection made to the
   checked address, with the URL's host in ``Host`` and in TLS SNI and certificate
   checks. Each attempt is signed afresh with the same ``webhook-id`` and must answer
   within :data:`DEFAULT_TIMEOUT` seconds all told; redirects are not followed (a 3xx is a
   failure: following one would let a public receiver bounce us into the private
   network); proxies from the environment are ignored for the same reason.
3. **Record** each result as it comes: a 2xx is ``delivered``; anything else fails the
   attempt, backs the endpoint off (:mod:`mailer.events.retry`), leaves the rest of its
   claimed deliveries for the next probe, and gives up deliveries that have waited 24 hours.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

import httpx
from sqlalchemy import Connection, delete, exists, select, update

from mailer.events.body import signed_headers
from mailer.events.record import DeliveryState
from mailer.events.retry import GIVE_UP_AFTER, gives_up, retry_delay
from mailer.events.secrets import SecretBox, SecretUnreadable
from mailer.events.targets import Resolver, TargetRefused, checked_addresses, system_resolver
from mailer.runtime import Runtime
from mailer.store.schema import (
    outbound_deliveries,
    outbound_delivery_counts,
    outbound_events,
    webhook_endpoints,
)

log = logging.getLogger(__name__)

#: SPEC 13: seconds a receiver has to answer one attempt, connection included.
DEFAULT_TIMEOUT = 10.0
#: Deliveries claimed per pass, all endpoints together: room for every endpoint's line.
DEFAULT_BATCH = 200
#: Deliveries claimed per endpoint per pass: they go out one after the other.
PER_ENDPOINT = 10
#: Endpoints posted to at the same time.
CONCURRENCY = 8
#: Delivered, dead and cancelled deliveries (and events left without any) are kept this
#: long for inspection, then pruned, so that stored addresses do not pile up.
RETENTION = timedelta(days=7)
#: How often a deliverer prunes, and the most rows one prune deletes per table.
PRUNE_EVERY = 600.0
PRUNE_LIMIT = 5000
USER_AGENT = "mailer-webhooks/1"

D = outbound_deliveries
E = webhook_endpoints


class Result(StrEnum):
    """What one attempt came to, as ``mailer_webhook_deliveries_total{result}`` counts it."""

    DELIVERED = "delivered"
    #: Non-2xx, redirect, timeout, refused connection: retried later.
    FAILED = "failed"
    #: The target resolved to an address we may not connect to: retried later.
    REFUSED = "refused"
    #: Failed after :data:`~mailer.events.retry.GIVE_UP_AFTER`: never tried again.
    DEAD = "dead"


@dataclass(frozen=True)
class Claimed:
    """One claimed delivery and what sending it needs."""

    id: int
    event_id: str
    endpoint_id: str
    url: str
    sealed_secret: str
    body: str
    created_at: datetime


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt: success, or why not (text without personal data)."""

    ok: bool
    error: str | None = None
    refused: bool = False


@dataclass
class PassReport:
    """What one delivery pass did."""

    claimed: int = 0
    results: Counter[str] = field(default_factory=Counter)


class Deliverer:
    """Delivers due event webhooks for one runtime; call :meth:`run_once` repeatedly."""

    def __init__(
        self, rt: Runtime, *, timeout: float = DEFAULT_TIMEOUT, batch: int = DEFAULT_BATCH,
        per_endpoint: int = PER_ENDPOINT, resolve: Resolver = system_resolver,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.rt = rt
        self.timeout = timeout
        self.batch = batch
        self.per_endpoint = per_endpoint
        # The lease outlasts the longest a claimed row can wait: every delivery before
        # it in its endpoint's line taking the full timeout.
        self.lease = timedelta(seconds=per_endpoint * timeout + 60)
        self.resolve = resolve
        self.transport = transport
        self.box = SecretBox.from_settings(rt.settings)
        self.allow_private = rt.settings.webhook_allow_private
        self.retry_base = rt.settings.webhook_retry_base
        self._next_prune = 0.0

    def run_once(self) -> PassReport:
        """Claim what is due, post it, record every result; prune now and then."""
        report = PassReport()
        claimed = self.claim(self.rt.clock())
        report.claimed = len(claimed)
        if claimed:
            asyncio.run(self._deliver(claimed, report))
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY
            self.prune(self.rt.clock())
        return report

    # --- claim ----------------------------------------------------------------------------

    def claim(self, now: datetime) -> list[Claimed]:
        """Claim due deliveries under a lease, in the order they are to go out."""
        with self.rt.engine.begin() as conn:
            ready = conn.execute(
                select(E.c.id).where(E.c.deleted_at.is_(None),
                                     E.c.retry_at.is_(None) | (E.c.retry_at <= now))
                .order_by(E.c.id)).scalars().all()
            # Endpoint by endpoint (there are few), so one receiver's backlog never fills
            # the pass and keeps the others waiting.
            picked: list[int] = []
            for endpoint_id in ready:
                picked += conn.execute(
                    select(D.c.id)
                    .where(D.c.endpoint_id == endpoint_id, D.c.state == DeliveryState.PENDING,
                           D.c.next_attempt_at <= now)
                    .order_by(D.c.next_attempt_at, D.c.id)
                    .limit(min(self.per_endpoint, self.batch - len(picked)))
                ).scalars().all()
                if len(picked) >= self.batch:
                    break
            if not picked:
                return []
            # The compare-and-set: a row another scheduler claimed meanwhile has its
            # next_attempt_at in the future and is not returned here.
            won = {r.id for r in conn.execute(
                update(D)
                .where(D.c.id.in_(picked), D.c.state == DeliveryState.PENDING,
                       D.c.next_attempt_at <= now)
                .values(next_attempt_at=now + self.lease)
                .returning(D.c.id))}
            if not won:
                return []
            details = {r.id: r for r in conn.execute(
                select(D.c.id, D.c.event_id, D.c.endpoint_id, D.c.created_at, E.c.url,
                       E.c.secret, outbound_events.c.body)
                .select_from(D.join(E, E.c.id == D.c.endpoint_id)
                             .join(outbound_events, outbound_events.c.id == D.c.event_id))
                .where(D.c.id.in_(sorted(won))))}
        return [
            Claimed(id=r.id, event_id=r.event_id, endpoint_id=r.endpoint_id, url=r.url,
                    sealed_secret=r.secret, body=r.body, created_at=r.created_at)
            for r in (details[i] for i in picked if i in details)
        ]

    # --- post -----------------------------------------------------------------------------

    async def _deliver(self, claimed: Sequence[Claimed], report: PassReport) -> None:
        lines: dict[str, list[Claimed]] = {}
        for item in claimed:
            lines.setdefault(item.endpoint_id, []).append(item)
        gate = asyncio.Semaphore(CONCURRENCY)
        outcomes = await asyncio.gather(
            *(self._line(gate, items, report) for items in lines.values()),
            return_exceptions=True)
        for outcome in outcomes:
            # One endpoint's trouble (a database hiccup while recording) must not stop
            # the others; its claimed rows are due again when their lease runs out.
            if isinstance(outcome, BaseException):
                log.warning("event webhook line failed: %s", type(outcome).__name__)

    async def _line(self, gate: asyncio.Semaphore, items: list[Claimed],
                    report: PassReport) -> None:
        """One endpoint's claimed deliveries, in order, until the first failure."""
        # A client (and connection pool) per endpoint: pools are keyed by address, and a
        # TLS connection verified for one endpoint's name must never carry another's.
        async with gate, httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout), follow_redirects=False, trust_env=False,
            transport=self.transport,
        ) as client:
            first = items[0]
            try:
                url = httpx.URL(first.url)
                secret = self.box.open(first.sealed_secret, first.endpoint_id)
                addresses = await checked_addresses(url, self.allow_private, self.resolve)
            except TargetRefused as exc:
                await self._record(first, Attempt(False, exc.message, refused=True),
                                   items[1:], report)
                return
            except SecretUnreadable as exc:
                await self._record(first, Attempt(False, f"secret unreadable: {exc}"),
                                   items[1:], report)
                return
            except httpx.InvalidURL:
                await self._record(first, Attempt(False, "invalid URL"), items[1:], report)
                return
            for index, item in enumerate(items):
                attempt = await self._post(client, url, addresses, item, secret)
                await self._record(item, attempt, () if attempt.ok else items[index + 1:],
                                   report)
                if not attempt.ok:
                    return

    async def _post(self, client: httpx.AsyncClient, url: httpx.URL,
                    addresses: Sequence[str], item: Claimed, secret: str) -> Attempt:
        """POST one delivery to the first checked address that takes the connection."""
        body = item.body.encode()
        headers = signed_headers(secret, item.event_id, body, int(self.rt.clock().timestamp()))
        headers["host"] = url.netloc.decode("ascii")
        headers["user-agent"] = USER_AGENT
        # TLS is checked against the URL's host name, not the address we connect to.
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        try:
            # One limit for the whole attempt, however many addresses it tries.
            async with asyncio.timeout(self.timeout):
                for address in addresses:
                    request = client.build_request("POST", url.copy_with(host=address),
                                                   content=body, headers=headers,
                                                   extensions=extensions)
                    try:
                        response = await client.send(request, stream=True)
                    except httpx.ConnectError as exc:
                        if _tls_failed(exc):
                            return Attempt(False, "TLS handshake failed (is the certificate "
                                                  "valid for the URL's host?)")
                        continue  # the host's next address, if it has one
                    await response.aclose()  # the receiver's body is not ours to keep
                    return _judge(response.status_code)
        except (TimeoutError, httpx.TimeoutException):
            return Attempt(False, f"no answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            return Attempt(False, f"transport error ({type(exc).__name__})")
        return Attempt(False, "connection refused or unreachable")

    # --- record ---------------------------------------------------------------------------

    async def _record(self, item: Claimed, attempt: Attempt, released: Sequence[Claimed],
                      report: PassReport) -> None:
        results = await asyncio.to_thread(self._record_now, item, attempt, released)
        report.results.update(results)

    def _record_now(self, item: Claimed, attempt: Attempt,
                    released: Sequence[Claimed]) -> Counter[str]:
        now = self.rt.clock()
        results: Counter[str] = Counter()
        with self.rt.engine.begin() as conn:
            if attempt.ok:
                conn.execute(update(D).where(D.c.id == item.id).values(
                    state=DeliveryState.DELIVERED, attempts=D.c.attempts + 1,
                    last_attempt_at=now, delivered_at=now, last_error=None))
                conn.execute(update(E).where(E.c.id == item.endpoint_id).values(
                    failures=0, failing_since=None, retry_at=None))
                results[Result.DELIVERED] += 1
            else:
                results.update(self._record_failure(conn, item, attempt, released, now))
            for result, count in results.items():
                conn.execute(update(outbound_delivery_counts)
                             .where(outbound_delivery_counts.c.result == result)
                             .values(count=outbound_delivery_counts.c.count + count))
        if not attempt.ok:
            # The endpoint id only: URLs may carry tokens, and errors name no person.
            log.info("event webhook to endpoint %s failed: %s", item.endpoint_id,
                     attempt.error)
        return results

    def _record_failure(self, conn: Connection, item: Claimed, attempt: Attempt,
                        released: Sequence[Claimed], now: datetime) -> Counter[str]:
        results: Counter[str] = Counter()
        error = (attempt.error or "failed")[:200]
        dead = gives_up(item.created_at, now)
        # Due again at once, but behind its endpoint's backoff (the claim checks it).
        conn.execute(update(D).where(D.c.id == item.id).values(
            state=DeliveryState.DEAD if dead else DeliveryState.PENDING,
            attempts=D.c.attempts + 1, last_attempt_at=now, last_error=error,
            next_attempt_at=now))
        results[Result.DEAD if dead else Result.REFUSED if attempt.refused
                else Result.FAILED] += 1
        if released:
            conn.execute(update(D).where(D.c.id.in_([r.id for r in released]),
                                         D.c.state == DeliveryState.PENDING)
                         .values(next_attempt_at=now))
        endpoint = conn.execute(select(E.c.failures, E.c.failing_since)
                                .where(E.c.id == item.endpoint_id)).first()
        failures = (endpoint.failures if endpoint is not None else 0) + 1
        conn.execute(update(E).where(E.c.id == item.endpoint_id).values(
            failures=failures,
            failing_since=(endpoint.failing_since if endpoint is not None
                           and endpoint.failing_since is not None else now),
            retry_at=now + retry_delay(failures, self.retry_base),
            last_error=error, last_error_at=now))
        # Its other deliveries that have waited as long are given up with it: the
        # endpoint has been probed throughout, and is failing still.
        stale = conn.execute(update(D).where(
            D.c.endpoint_id == item.endpoint_id, D.c.state == DeliveryState.PENDING,
            D.c.created_at <= now - GIVE_UP_AFTER, D.c.next_attempt_at <= now,
        ).values(state=DeliveryState.DEAD, last_error=error))
        results[Result.DEAD] += int(stale.rowcount or 0)
        return +results

    # --- prune ----------------------------------------------------------------------------

    def prune(self, now: datetime) -> int:
        """Cancel what deleted endpoints left pending; delete old finished rows; return
        how many delivery rows were deleted."""
        cutoff = now - RETENTION
        with self.rt.engine.begin() as conn:
            deleted_endpoints = select(E.c.id).where(E.c.deleted_at.is_not(None))
            conn.execute(update(D).where(D.c.state == DeliveryState.PENDING,
                                         D.c.endpoint_id.in_(deleted_endpoints))
                         .values(state=DeliveryState.CANCELLED))
            old = [r.id for r in conn.execute(
                select(D.c.id).where(D.c.state != DeliveryState.PENDING,
                                     D.c.created_at < cutoff).limit(PRUNE_LIMIT))]
            if old:
                conn.execute(delete(D).where(D.c.id.in_(old)))
            orphans = [r.id for r in conn.execute(
                select(outbound_events.c.id)
                .where(outbound_events.c.created_at < cutoff,
                       ~exists().where(D.c.event_id == outbound_events.c.id))
                .limit(PRUNE_LIMIT))]
            if orphans:
                conn.execute(delete(outbound_events).where(outbound_events.c.id.in_(orphans)))
        return len(old)


def _judge(code: int) -> Attempt:
    """A 2xx is delivered; anything else, a 3xx included, is a failure to retry."""
    if 200 <= code < 300:
        return Attempt(True)
    if 300 <= code < 400:
        return Attempt(False, f"HTTP {code}: redirects are not followed")
    return Attempt(False, f"HTTP {code}")


def _tls_failed(exc: BaseException) -> bool:
    """Whether a connection error was a TLS failure (a certificate, not the network)."""
    seen: BaseException | None = exc
    for _ in range(10):  # the chain is short; bounded all the same
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


__all__ = ["Attempt", "Claimed", "Deliverer", "PassReport", "Result"]

