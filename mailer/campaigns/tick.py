"""The scheduler's campaign job: start what is due, fan out within a budget, complete.

Every step is a compare-and-set on the campaign's status (:mod:`mailer.campaigns.lifecycle`),
so two schedulers, or one restarted mid-way, never start or fan out a campaign twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import and_, func, select, update

from mailer.campaigns import lifecycle as model
from mailer.campaigns.audience import DEFAULT_BATCH, AudienceFilter, audience_count
from mailer.campaigns.fanout import fan_out_batch
from mailer.campaigns.lifecycle import CampaignStatus
from mailer.runtime import Runtime
from mailer.store.schema import campaigns, recipients

log = logging.getLogger(__name__)

#: How long one scheduler tick may fan out before the sweeper gets its turn.
DEFAULT_BUDGET = timedelta(seconds=2)


def start_due(rt: Runtime) -> tuple[list[str], list[str]]:
    """Start every due campaign exactly once; mark those found too late. Return both."""
    now = rt.clock()
    lateness = rt.settings.campaign_max_lateness
    started: list[str] = []
    late: list[str] = []
    with rt.engine.connect() as conn:
        due = conn.execute(
            select(campaigns.c.id, campaigns.c.send_at, campaigns.c.allow_late,
                   campaigns.c.audience)
            .where(campaigns.c.status == CampaignStatus.SCHEDULED, campaigns.c.send_at <= now)
            .order_by(campaigns.c.send_at)
        ).all()
    for c in due:
        with rt.engine.begin() as conn:
            guard = and_(campaigns.c.id == c.id, campaigns.c.status == CampaignStatus.SCHEDULED)
            if not c.allow_late and now - c.send_at > lateness:
                # SPEC 9: never sent silently late; it waits for an explicit resume.
                result = conn.execute(update(campaigns).where(guard).values(
                    status=CampaignStatus.PAUSED, late=True, paused_at=now, updated_at=now))
                if result.rowcount:
                    late.append(c.id)
                continue
            upto = conn.execute(select(func.coalesce(func.max(recipients.c.id), 0))
                                ).scalar_one()
            size = audience_count(conn, AudienceFilter.parse(c.audience), upto)
            # The one compare-and-set that starts a campaign: of two schedulers (or one
            # restarted mid-way) exactly one sees rowcount 1.
            result = conn.execute(update(campaigns).where(guard).values(
                status=CampaignStatus.RUNNING, started_at=now, max_recipient_id=upto,
                audience_count=size, last_recipient_id=0, written=0, next_batch_at=None,
                updated_at=now))
            if result.rowcount:
                started.append(c.id)
    return started, late


@dataclass
class TickReport:
    """What one scheduler tick did for campaigns."""

    started: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    written: int = 0
    busy: bool = False  # stopped by the time budget with work left


def tick(rt: Runtime, budget: timedelta = DEFAULT_BUDGET, batch: int = DEFAULT_BATCH
         ) -> TickReport:
    """The scheduler's campaign job: start, fan out round-robin within ``budget``, complete."""
    report = TickReport()
    report.started, report.late = start_due(rt)
    with rt.engine.connect() as conn:
        active = [r.id for r in conn.execute(
            select(campaigns.c.id)
            .where(campaigns.c.status == CampaignStatus.RUNNING,
                   campaigns.c.fanned_out_at.is_(None))
            .order_by(campaigns.c.started_at))]
    deadline = time.monotonic() + budget.total_seconds()
    while active:
        progressed = []
        for campaign_id in active:
            if time.monotonic() > deadline:
                report.busy = True
                break
            try:
                result = fan_out_batch(rt, campaign_id, batch)
            except Exception as exc:  # one broken campaign must not stop the others
                log.warning("fan-out of campaign %s failed: %s", campaign_id,
                            type(exc).__name__)
                continue
            report.written += result.written
            if result.advanced:
                progressed.append(campaign_id)
        if report.busy:
            break
        active = progressed
    with rt.engine.begin() as conn:
        strays = model.release_strays(conn, rt.clock())
        report.completed = model.complete_finished(conn, rt.clock())
    if strays:
        rt.enqueuer.enqueue(strays)
    return report
