"""Histograms observed in one process and shown by another, through Redis (SPEC 7).

Workers time SMTP transactions; Prometheus scrapes the API. Those are different
processes and, in production, different hosts (docs/production.md), so observations
travel through Redis, which every process already reaches: a process counts into memory
(no I/O on the sending path), a :class:`Publisher` thread adds the increments to one Redis
hash per histogram every few seconds, and the API's ``/metrics`` reads the hashes with
:class:`SharedCollector`. prometheus-client's multiprocess mode was the alternative; it
shares files in one directory, so the API would see only the workers of its own host.

The hash holds per-bucket counts (not cumulative) and the sum, each added with HINCRBY /
HINCRBYFLOAT, so any number of processes publish without coordinating, and totals never
go back when a worker restarts.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

#: Seconds between two publications of a process's observations.
DEFAULT_PUBLISH_INTERVAL = 5.0
#: Upper bounds (seconds) of the SMTP transaction buckets: a relay on the same network
#: answers in milliseconds, a remote one in tens to hundreds; 30 s is the default timeout.
SMTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Prefix of the Redis hashes; the histogram's name follows.
KEY_PREFIX = "mailer:metrics:"
_SUM = "sum"


class SharedHistogram:
    """A Prometheus histogram whose observations are published to Redis."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(buckets))
        #: Field names in the hash, one per bucket, the last one +Inf.
        self.fields = [*(str(float(b)) for b in self.bounds), "+Inf"]
        self.key = KEY_PREFIX + name
        self._lock = threading.Lock()
        self._counts = [0] * len(self.fields)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (in memory; a :class:`Publisher` sends it on)."""
        # Prometheus buckets are "less than or equal": the first bound >= value.
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def drain(self) -> tuple[list[int], float]:
        """Take the observations not yet published, leaving none."""
        with self._lock:
            counts, total = self._counts, self._sum
            self._counts, self._sum = [0] * len(self.fields), 0.0
        return counts, total

    def restore(self, counts: list[int], total: float) -> None:
        """Put back what :meth:`drain` took when it could not be published."""
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def family(self, stored: Mapping[bytes, bytes]) -> HistogramMetricFamily:
        """The histogram as the hash ``stored`` (HGETALL) holds it, buckets cumulated."""
        running = 0
        buckets: list[tuple[str, float]] = []
        for name in self.fields:
            running += int(stored.get(name.encode(), b"0"))
            buckets.append((name, float(running)))
        total = float(stored.get(_SUM.encode(), b"0"))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, total)
        return family


#: SPEC 7: time of one SMTP transaction (MAIL FROM to the reply after the data), observed
#: by the workers whatever the outcome; connecting and TLS are not included.
SMTP_SECONDS = SharedHistogram(
    "mailer_smtp_seconds",
    "Duration of SMTP transactions with the relay (MAIL FROM to the final reply), seconds",
    SMTP_BUCKETS,
)


class Publisher:
    """Adds a process's observations to Redis every ``interval`` seconds, in a thread."""

    def __init__(self, client: Redis[bytes], histograms: Iterable[SharedHistogram],
                 interval: float = DEFAULT_PUBLISH_INTERVAL) -> None:
        self.client = client
        self.histograms = list(histograms)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> bool:
        """Send what was observed since the last call; False (kept for later) if Redis fails."""
        ok = True
        for histogram in self.histograms:
            counts, total = histogram.drain()
            if not any(counts):
                continue
            try:
                pipe = self.client.pipeline(transaction=True)
                for name, count in zip(histogram.fields, counts, strict=True):
                    if count:
                        pipe.hincrby(histogram.key, name, count)
                pipe.hincrbyfloat(histogram.key, _SUM, total)
                pipe.execute()
            except Exception as exc:  # Redis down: the counts wait in memory for the next try
                histogram.restore(counts, total)
                log.warning("could not publish %s: %s", histogram.name, type(exc).__name__)
                ok = False
        return ok

    def start(self) -> None:
        """Publish in a daemon thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metrics-publisher",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and publish what is left (at process exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        self.publish()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.publish()


class SharedCollector(Collector):
    """What every process published, read from Redis at scrape time."""

    def __init__(self, client: Redis[bytes],
                 histograms: Iterable[SharedHistogram] = (SMTP_SECONDS,)) -> None:
        self.client = client
        self.histograms = list(histograms)

    def collect(self) -> Iterator[Metric]:
        """One family per histogram; none when Redis does not answer (unknown, not zero)."""
        for histogram in self.histograms:
            try:
                stored = self.client.hgetall(histogram.key)
            except Exception as exc:
                log.warning("could not read %s: %s", histogram.name, type(exc).__name__)
                continue
            yield histogram.family(stored)
