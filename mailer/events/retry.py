"""When a failing event webhook is tried again, and when it is given up (SPEC 13).

The backoff belongs to the endpoint, not to each event: a receiver that is down is probed
by one delivery at a time, at growing intervals, instead of by every queued event, and a
dead receiver cannot crowd out healthy ones. Delays double from the base (30 s unless
``MAILER_WEBHOOK_RETRY_BASE`` says otherwise) up to :data:`MAX_DELAY`, each spread by
+-20 % jitter so that endpoints that failed together do not retry in lockstep. A delivery
is given up ("dead") only when an attempt fails after it has waited
:data:`GIVE_UP_AFTER`: every event is retried for at least 24 hours.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

#: The longest pause between two probes of a failing endpoint (before jitter).
MAX_DELAY = timedelta(hours=2)
#: SPEC 13: failures are retried for at least this long, then the delivery is dead.
GIVE_UP_AFTER = timedelta(hours=24)
#: The jitter factor's range around 1.
JITTER = 0.2

_rng = random.Random()


def retry_delay(failures: int, base: timedelta, *, cap: timedelta = MAX_DELAY,
                rng: random.Random = _rng) -> timedelta:
    """The pause after the ``failures``-th failure in a row (1 for the first)."""
    exponent = min(max(failures - 1, 0), 32)  # 2**32 times any base is past the cap
    delay: timedelta = min(base * (2 ** exponent), cap)
    return delay * rng.uniform(1 - JITTER, 1 + JITTER)


def gives_up(created_at: datetime, now: datetime) -> bool:
    """Whether a delivery created at ``created_at`` that fails at ``now`` is dead."""
    return now - created_at >= GIVE_UP_AFTER
