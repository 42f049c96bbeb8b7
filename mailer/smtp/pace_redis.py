"""The sending pace shared through Redis by every worker process and host (SPEC 5).

Each step is one Lua script, atomic on the server, on the server's clock (``TIME``), so
hosts with skewed clocks still agree. The scripts mirror :mod:`mailer.smtp.bucket` (the
pure reference) and :class:`~mailer.smtp.pace.MemoryPace` line by line.

Keys, each with a TTL: ``<prefix>:global`` is the relay's pace, shared by every domain
(the global bucket of ``MAILER_SMTP_MAX_RATE`` and, after a relay-wide throttling reply,
its slowdown); ``<prefix>:rate:<domain>`` a domain's bucket and slowdown, in the same
fields; ``<prefix>:busy:<domain>`` the domain's open transactions.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import redis.asyncio as aioredis

from mailer.smtp import bucket
from mailer.smtp.limits import normalise_domain
from mailer.smtp.pace import (
    BUSY_POLL,
    DEFAULT_PREFIX,
    DomainStatus,
    Pace,
    PaceLimits,
    Permit,
    is_relay_throttling,
    is_throttling,
)
from mailer.smtp.replies import Stage

# The Lua below mirrors mailer.smtp.bucket; keep the two in step. Numbers travel as
# strings ("%.17g" both ways) because Redis truncates a Lua number reply to an integer.
_LUA_COMMON = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local BURST = tonumber(ARGV[1])
local EPSILON = 1e-9

-- bucket.current_rate/recovered: a domain's or the relay's pace (configured 0: none),
-- clearing a finished slowdown.
local function current_rate(key, configured, base, recovery)
  local s = redis.call('HMGET', key, 'srate', 'since')
  local srate, since = tonumber(s[1]), tonumber(s[2])
  if srate == nil or since == nil then
    return configured, false
  end
  local pace = math.min(base, srate + base * recovery * math.max(0, now - since))
  if pace >= base then
    redis.call('HDEL', key, 'srate', 'since')
    return configured, false
  end
  return pace, true
end

-- bucket.refill: tokens and time of a bucket refilled at rate; a new bucket starts full.
local function refill(key, rate)
  local v = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, at = tonumber(v[1]), tonumber(v[2])
  local cap = rate * BURST
  if tokens == nil or at == nil then
    return cap, now
  end
  return math.min(cap, tokens + math.max(0, now - at) * rate), math.max(now, at)
end

-- bucket.take without writing: tokens left after taking n (nil if refused), wait, time.
local function take(key, n, rate)
  local tokens, at = refill(key, rate)
  local needed = math.min(n, rate * BURST)
  if tokens + EPSILON >= needed then
    return tokens - n, 0, at
  end
  return nil, (needed - tokens) / rate, at
end
"""

# KEYS: global (relay) pace, domain pace, domain leases.
# ARGV: burst seconds, n, global rate (0: none), domain rate (0: none), throttle base,
#       recovery per second, concurrency (0: none), lease s, permit token, ttl ms, busy poll s,
#       relay throttle base
_ACQUIRE = _LUA_COMMON + """
local n = tonumber(ARGV[2])
local global_rate = tonumber(ARGV[3])
local configured = tonumber(ARGV[4])
local base = tonumber(ARGV[5])
local recovery = tonumber(ARGV[6])
local concurrency = tonumber(ARGV[7])
local lease = tonumber(ARGV[8])
local ttl = tonumber(ARGV[10])

if concurrency > 0 then
  -- Expired leases belong to transactions whose worker died: their slots are free.
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= concurrency then
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {0, tostring(math.min(tonumber(first[2]) - now, tonumber(ARGV[11]))), 'busy'}
  end
end

local rate = current_rate(KEYS[2], configured, base, recovery)
local d_tokens, d_wait, d_at = nil, 0, now
if rate > 0 then
  d_tokens, d_wait, d_at = take(KEYS[2], n, rate)
end
-- A relay-wide throttling reply slows the global pace, with a rate even when unlimited.
global_rate = current_rate(KEYS[1], global_rate, tonumber(ARGV[12]), recovery)
local g_tokens, g_wait, g_at = nil, 0, now
if global_rate > 0 then
  g_tokens, g_wait, g_at = take(KEYS[1], n, global_rate)
end
if d_wait > 0 or g_wait > 0 then
  if d_wait >= g_wait then
    return {0, tostring(d_wait), 'domain'}
  end
  return {0, tostring(g_wait), 'global'}
end

-- Everything allows it: take from all at once (never from one and not another).
if rate > 0 then
  redis.call('HSET', KEYS[2], 'tokens', d_tokens, 'at', d_at)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if global_rate > 0 then
  redis.call('HSET', KEYS[1], 'tokens', g_tokens, 'at', g_at)
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if concurrency > 0 then
  redis.call('ZADD', KEYS[3], now + lease, ARGV[9])
  redis.call('PEXPIRE', KEYS[3], math.ceil((lease + 1) * 1000))
end
return {1, ''}
"""

# KEYS: domain leases, the pace to slow: the domain's, or the global one for a relay-wide
#       reply (the same fields and rules).
# ARGV: burst seconds, permit token, throttled (1/0), that pace's configured rate (0: none),
#       its throttle base, recovery per second, floor fraction, slowdown interval s, ttl ms
_RELEASE = _LUA_COMMON + """
redis.call('ZREM', KEYS[1], ARGV[2])
if ARGV[3] ~= '1' then
  return 0
end
local configured = tonumber(ARGV[4])
local base = tonumber(ARGV[5])
local recovery = tonumber(ARGV[6])
local s = redis.call('HMGET', KEYS[2], 'since')
local since = tonumber(s[1])
local rate, slowed = current_rate(KEYS[2], configured, base, recovery)
if slowed and now - since < tonumber(ARGV[8]) then
  return 0  -- bucket.slow_down: halved less than a second ago, the same signal again
end
local pace = base
if slowed then
  pace = rate
end
local tokens = 0
if rate > 0 then
  tokens = math.min(refill(KEYS[2], rate), 0)
end
redis.call('HSET', KEYS[2], 'srate', math.max(pace / 2, base * tonumber(ARGV[7])),
           'since', now, 'tokens', tokens, 'at', now)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[9]))
return 1
"""

# KEYS: domain pace, global (relay) pace.
# ARGV: burst seconds, domain rate (0: none), throttle base, recovery, global rate (0: none),
#       relay throttle base.
# Returns {rate or '', slowed 1/0, recovers in s, next token in s}, the domain's and then
# the relay's.
_STATUS = _LUA_COMMON + """
local recovery = tonumber(ARGV[4])

-- bucket.recovery_time and wait_for of one pace, as strings.
local function status(key, configured, base)
  local rate, slowed = current_rate(key, configured, base, recovery)
  if rate <= 0 then
    return '', 0, '0', '0'
  end
  local recovers_in = 0
  if slowed then
    recovers_in = (base - rate) / (base * recovery)
  end
  local _, wait = take(key, 1, rate)
  return tostring(rate), slowed and 1 or 0, tostring(recovers_in), tostring(wait)
end

local d_rate, d_slowed, d_recovers, d_next = status(KEYS[1], tonumber(ARGV[2]),
                                                    tonumber(ARGV[3]))
local g_rate, g_slowed, g_recovers, g_next = status(KEYS[2], tonumber(ARGV[5]),
                                                    tonumber(ARGV[6]))
return {d_rate, d_slowed, d_recovers, d_next, g_rate, g_slowed, g_recovers, g_next}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPace(Pace):
    """The pace shared through Redis by every worker process and host."""

    def __init__(
        self,
        client: aioredis.Redis[Any],
        limits: PaceLimits,
        *,
        prefix: str = DEFAULT_PREFIX,
        **kwargs: Any,
    ) -> None:
        super().__init__(limits, **kwargs)
        self._redis = client
        self._prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._status = client.register_script(_STATUS)
        self._ttl_ms = bucket.ttl_seconds(limits.recovery) * 1000

    @classmethod
    def from_url(cls, url: str, limits: PaceLimits, **kwargs: Any) -> RedisPace:
        """A pace on the Redis at ``url`` (``MAILER_REDIS_URL``); create it on its loop."""
        return cls(aioredis.Redis.from_url(url), limits, **kwargs)

    def _keys(self, domain: str) -> tuple[str, str, str]:
        # Cluster users: these keys share no hash slot; the pace needs one Redis (or a tag).
        return (f"{self._prefix}:global", f"{self._prefix}:rate:{domain}",
                f"{self._prefix}:busy:{domain}")

    def _rates(self, domain: str) -> tuple[float, float]:
        limit = self.limits.for_domain(domain)
        return (limit.rate if limit else 0.0), self.limits.base_rate(domain)

    async def try_acquire(self, domain: str, n: int = 1) -> Permit | float:
        """A permit if the transaction may start now, else the seconds to wait first."""
        self._check(n)
        domain = normalise_domain(domain)
        limit = self.limits.for_domain(domain)
        configured, base = self._rates(domain)
        concurrency = limit.concurrency if limit and limit.concurrency else 0
        token = uuid.uuid4().hex
        reply = await self._acquire(
            keys=list(self._keys(domain)),
            args=[
                repr(bucket.BURST_SECONDS), n, repr(self.limits.max_rate or 0.0),
                repr(configured), repr(base), repr(self.limits.recovery), concurrency,
                repr(self.limits.lease), token, self._ttl_ms, repr(BUSY_POLL),
                repr(self.limits.relay_base_rate()),
            ],
        )
        if int(reply[0]) == 1:
            return Permit(domain, n, token)
        return max(float(_text(reply[1])), 0.0)

    async def release(self, permit: Permit, code: int | None = None, text: str = "",
                      stage: Stage | None = None) -> bool:
        """Free the permit's slot; report the reply. True when it slowed a pace down."""
        global_key, pace_key, busy_key = self._keys(permit.domain)
        configured, base = self._rates(permit.domain)
        throttled = is_throttling(code, text)
        if throttled and is_relay_throttling(code, text, stage):
            # About our account at the relay: slow the global pace every domain shares.
            pace_key = global_key
            configured, base = self.limits.max_rate or 0.0, self.limits.relay_base_rate()
        # Shielded: a worker cancelled while releasing must still free the slot, or the
        # domain loses it until the lease expires.
        reply = await asyncio.shield(self._release(
            keys=[busy_key, pace_key],
            args=[
                repr(bucket.BURST_SECONDS), permit.token, "1" if throttled else "0",
                repr(configured), repr(base), repr(self.limits.recovery),
                repr(bucket.MIN_RATE_FRACTION), repr(bucket.SLOWDOWN_INTERVAL), self._ttl_ms,
            ],
        ))
        return int(reply) == 1

    async def status(self, domain: str) -> DomainStatus:
        """The domain's pace right now, and the relay's (the global pace)."""
        domain = normalise_domain(domain)
        configured, base = self._rates(domain)
        global_key, pace_key, _ = self._keys(domain)
        reply = await self._status(
            keys=[pace_key, global_key],
            args=[repr(bucket.BURST_SECONDS), repr(configured), repr(base),
                  repr(self.limits.recovery), repr(self.limits.max_rate or 0.0),
                  repr(self.limits.relay_base_rate())],
        )
        rate, relay_rate = _text(reply[0]), _text(reply[4])
        return DomainStatus(
            rate=float(rate) if rate else None,
            slowed=int(reply[1]) == 1,
            recovers_in=max(float(_text(reply[2])), 0.0),
            next_in=max(float(_text(reply[3])), 0.0),
            relay_rate=float(relay_rate) if relay_rate else None,
            relay_slowed=int(reply[5]) == 1,
            relay_recovers_in=max(float(_text(reply[6])), 0.0),
            relay_next_in=max(float(_text(reply[7])), 0.0),
        )

    async def close(self) -> None:
        """Close the Redis connections."""
        # types-redis still lacks aclose(), which redis-py 5+ has (close() is deprecated).
        await self._redis.aclose()  # type: ignore[attr-defined]
