"""The scheduler process: runs the outbox sweeper and other periodic jobs until stopped."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from mailer.config import Settings
from mailer.runtime import Runtime
from mailer.sweeper import sweep

log = logging.getLogger("mailer.scheduler")


def run(settings: Settings | None = None, stop: threading.Event | None = None) -> None:
    """Sweep every ``MAILER_SWEEP_INTERVAL`` until ``stop`` is set or SIGTERM/SIGINT."""
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
    while not stop.is_set():
        try:
            report = sweep(rt)
            if report.enqueued or report.expired_suppressions:
                log.info("sweep: re-enqueued %d, expired %d suppressions",
                         report.enqueued, report.expired_suppressions)
        except Exception as exc:  # keep sweeping through a database or Redis outage
            log.warning("sweep failed: %s", type(exc).__name__)
        stop.wait(interval)
    log.info("scheduler stopped")


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run()


if __name__ == "__main__":
    main()
