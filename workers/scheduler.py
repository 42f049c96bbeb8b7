"""The scheduler process: campaigns, the outbox sweeper, event webhooks and other periodic
jobs, until stopped."""

from __future__ import annotations

import logging
import threading
import time

from mailer.campaigns.tick import tick as campaign_tick
from mailer.config import Settings, load_or_exit
from mailer.events.delivery import Deliverer
from mailer.runtime import Runtime, stop_on_signals
from mailer.sending.sweeper import sweep
from mailer.store.db import checkpoint_wal

log = logging.getLogger("mailer.scheduler")

#: Seconds between campaign ticks (starts, paced batches, completion).
CAMPAIGN_TICK = 0.25
#: Seconds the event webhook thread waits when nothing was due (SPEC 13).
WEBHOOK_POLL = 0.5


def run(settings: Settings | None = None, stop: threading.Event | None = None) -> None:
    """Sweep every ``MAILER_SWEEP_INTERVAL`` and run campaigns, until ``stop`` or SIGTERM."""
    settings = settings or Settings.from_environ()
    stop = stop_on_signals(stop)
    rt = Runtime.from_settings(settings)
    # Its own thread: a receiver taking its full 10 s must not hold up campaigns or sweeps.
    threading.Thread(target=deliver_events, args=(rt, stop), name="event-webhooks",
                     daemon=True).start()
    if settings.bounce_imap_url:
        threading.Thread(target=poll_bounces, args=(rt, stop), name="bounce-poller",
                         daemon=True).start()
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
        try:
            checkpoint_wal(rt.engine)
        except Exception as exc:  # a busy or missing database file: the next tick retries
            log.warning("WAL checkpoint failed: %s", type(exc).__name__)
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


def deliver_events(rt: Runtime, stop: threading.Event) -> None:
    """Deliver due outbound event webhooks (SPEC 13) until ``stop``; a busy pass goes on
    at once, an idle one waits :data:`WEBHOOK_POLL` seconds."""
    deliverer = Deliverer(rt)
    while not stop.is_set():
        busy = False
        try:
            report = deliverer.run_once()
            busy = report.claimed > 0
            if report.results:
                log.debug("event webhooks: %s", ", ".join(
                    f"{count} {result}" for result, count in sorted(report.results.items())))
        except Exception as exc:  # a database outage: the next pass retries
            log.warning("event webhook pass failed: %s", type(exc).__name__)
        if not busy:
            stop.wait(WEBHOOK_POLL)


def poll_bounces(rt: Runtime, stop: threading.Event) -> None:
    """Poll the bounce mailbox every ``MAILER_BOUNCE_POLL_INTERVAL`` (SPEC 12) until ``stop``.

    In its own thread: an IMAP server that is slow to answer must not hold up campaign
    ticks or the sweeper.
    """
    from mailer.inbound.imap import BouncePoller

    poller = BouncePoller(rt)
    interval = rt.settings.bounce_poll_interval.total_seconds()
    while not stop.is_set():
        try:
            report = poller.poll()
            if report.seen:
                log.info("bounce mailbox: %d seen, %d processed, %d failed",
                         report.seen, report.processed, report.failed)
        except Exception as exc:  # the mailbox may be down; the next poll retries
            log.warning("bounce mailbox poll failed: %s", type(exc).__name__)
        stop.wait(interval)


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # SPEC 6: check the whole configuration first; a bad setting exits 2 with one line.
    run(load_or_exit())


if __name__ == "__main__":
    main()
