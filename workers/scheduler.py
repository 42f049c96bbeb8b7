"""The scheduler process: campaigns, the outbox sweeper and other periodic jobs, until stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from mailer.campaigns.fanout import tick as campaign_tick
from mailer.config import Settings
from mailer.runtime import Runtime
from mailer.sending.sweeper import sweep

log = logging.getLogger("mailer.scheduler")

#: Seconds between campaign ticks (starts, paced batches, completion).
CAMPAIGN_TICK = 0.25


def run(settings: Settings | None = None, stop: threading.Event | None = None) -> None:
    """Sweep every ``MAILER_SWEEP_INTERVAL`` and run campaigns, until ``stop`` or SIGTERM."""
    settings = settings or Settings.from_environ()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def _stop(signum: int, frame: FrameType | None) -> None:
            stop.set()
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    rt = Runtime.from_settings(settings)
    interval = settings.sweep_interval.total_seconds()
    log.info("scheduler started, sweeping every %ss", interval)
    next_sweep = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + interval
            try:
                report = sweep(rt)
                if report.enqueued or report.expired_suppressions:
                    log.info("sweep: re-enqueued %d, expired %d suppressions",
                             report.enqueued, report.expired_suppressions)
            except Exception as exc:  # keep sweeping through a database or Redis outage
                log.warning("sweep failed: %s", type(exc).__name__)
        busy = False
        try:
            campaigns = campaign_tick(rt)
            busy = campaigns.busy
            for name, ids in (("started", campaigns.started), ("late", campaigns.late),
                              ("completed", campaigns.completed)):
                for campaign_id in ids:
                    log.info("campaign %s %s", campaign_id, name)
        except Exception as exc:  # same: a later tick retries
            log.warning("campaign tick failed: %s", type(exc).__name__)
        # Campaign starts, pacing and pause checks need a short tick (SPEC 9: "within
        # seconds"); a fan-out stopped by its time budget continues at once.
        if not busy:
            stop.wait(min(interval, CAMPAIGN_TICK))
    log.info("scheduler stopped")


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run()


if __name__ == "__main__":
    main()
