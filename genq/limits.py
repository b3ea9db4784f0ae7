"""A global rate limit, a concurrency cap and a shared 429 back-off for the upstream, kept in Redis so
every worker on every host obeys the same numbers.

Each limit is one Lua script timed by Redis's own clock (so hosts with skewed clocks agree):

- **rate**: a sliding window per endpoint family and one over all of them. A rate ``r`` admits
  ``n = ceil(r)`` calls in any ``n / r`` seconds: ``0.2`` is one call per 5 s, ``2.5`` three per 1.2 s,
  ``40`` forty per second; no second ever sees more than ``n``.
- **concurrency**: a semaphore of leases (a sorted set scored by expiry), so a worker killed mid-call
  frees its slot when the lease runs out.
- **back-off**: after a 429 the upstream is closed until its Retry-After for every worker, not just the
  one that saw it (quotas are per account, so every family waits).

A caller that is refused gets the seconds to wait and re-enqueues itself with that countdown: nothing
sleeps and no worker slot is held while waiting.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from genq import keys

_ACQUIRE = """
-- KEYS: blocked (all families), family window, total window, semaphore, the family's interactive
--       window, batch-turned-away marker, producers turned away (hash: producer -> when), the next
--       free turn of a turned-away batch call, the turns given (hash: caller -> when)
-- ARGV: family rate, total rate, max concurrent, lease seconds, token, window slack (1.05), lane
--       ('interactive', 'batch' or ''), batch share, producer ('' for none), weights (JSON object),
--       weight of producers not in it, producer window key prefix, seconds a turned-away producer
--       counts as waiting, caller (a job id: keeps its turn when it comes back; '' for none)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local blocked = tonumber(redis.call('GET', KEYS[1]) or '0')
if blocked > now then return {0, tostring(blocked - now)} end
-- A rate r admits n = ceil(r) calls in any window of n / r seconds (times the slack in ARGV[6]):
-- r per second on average, fractional rates included, and never more than n in one second.
local rates = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local counts, windows = {}, {}
local wait = 0
for i, rate in ipairs(rates) do
  if rate > 0 then
    counts[i] = math.ceil(rate)
    windows[i] = counts[i] / rate * tonumber(ARGV[6])
    local key = KEYS[i + 1]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - windows[i])
    if redis.call('ZCARD', key) >= counts[i] then
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      wait = math.max(wait, tonumber(oldest[2]) + windows[i] - now)
    end
  end
end
local cap = tonumber(ARGV[3])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= cap then
    local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    wait = math.max(wait, math.min(tonumber(first[2]) - now, 1.0))
  end
end
-- Lanes and producers share the window that governs the call: its family's, else the total's.
local g = (rates[1] > 0 and 1) or (rates[2] > 0 and 2) or nil
local lane, producer = ARGV[7], ARGV[9]
local reserved = tonumber(ARGV[8]) > 0 and redis.call('EXISTS', KEYS[6]) == 1
if wait == 0 and g and lane == 'interactive' and reserved then
  -- Batch calls were turned away lately: interactive ones leave them their reserved share.
  local allowed = counts[g] - math.floor(counts[g] * tonumber(ARGV[8]))
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - windows[g])
  if allowed < counts[g] and redis.call('ZCARD', KEYS[5]) >= allowed then
    local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    wait = math.max(0.001, tonumber(oldest[2]) + windows[g] - now)
  end
end
if wait == 0 and g and producer ~= '' then
  -- Weighted fair shares: a producer at or over its share of the window waits while another one,
  -- under its share, was turned away lately (ARGV[13] seconds, at least two windows: its retries
  -- come back late behind a flood's). A producer alone takes every call; one whose backlog is gone
  -- stops counting that long after its last call was turned away.
  local weights = cjson.decode(ARGV[10])
  local function weight(p) return tonumber(weights[p] or ARGV[11]) end
  local starving, total = {}, weight(producer)
  local marks = redis.call('HGETALL', KEYS[7])
  for i = 1, #marks, 2 do
    local p, at = marks[i], tonumber(marks[i + 1])
    if at < now - math.max(2 * windows[g], tonumber(ARGV[13])) then redis.call('HDEL', KEYS[7], p)
    elseif p ~= producer then
      local key = ARGV[12] .. p
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - windows[g])
      table.insert(starving, {p, redis.call('ZCARD', key)})
      total = total + weight(p)
    end
  end
  if #starving > 0 then
    local mine_key = ARGV[12] .. producer
    redis.call('ZREMRANGEBYSCORE', mine_key, '-inf', now - windows[g])
    local mine = redis.call('ZCARD', mine_key)
    if mine >= math.max(1, math.floor(counts[g] * weight(producer) / total)) then
      for _, s in ipairs(starving) do
        if s[2] < counts[g] * weight(s[1]) / total then
          local oldest = redis.call('ZRANGE', mine_key, 0, 0, 'WITHSCORES')
          wait = math.max(0.001, math.min(tonumber(oldest[2]) + windows[g] - now, windows[g]))
          break
        end
      end
    end
  end
end
if wait > 0 then
  if g and lane == 'batch' then
    redis.call('SET', KEYS[6], '1', 'PX', math.ceil(2000 * windows[g]))
    -- A turned-away batch call takes the next free turn of the rate (a virtual queue), so a backlog of
    -- thousands comes back about as fast as the rate admits, not all at once every window. One that
    -- came back at its turn and lost the slot (to interactive work) keeps its place at the front.
    local had = ARGV[14] ~= '' and tonumber(redis.call('HGET', KEYS[9], ARGV[14]) or '0') or 0
    if had == 0 or had > now + windows[g] then
      local turn = math.max(now + wait, tonumber(redis.call('GET', KEYS[8]) or '0')) + windows[g] / counts[g]
      redis.call('SET', KEYS[8], tostring(turn), 'PX', math.ceil(1000 * (turn - now + windows[g])))
      wait = turn - now
    end
    if ARGV[14] ~= '' then
      redis.call('HSET', KEYS[9], ARGV[14], tostring(now + wait))
      local keep = math.ceil(1000 * (wait + 2 * windows[g]))
      if redis.call('PTTL', KEYS[9]) < keep then redis.call('PEXPIRE', KEYS[9], keep) end
    end
  end
  if g and producer ~= '' then redis.call('HSET', KEYS[7], producer, tostring(now)) end
  return {0, tostring(wait)}
end
if g then
  local ttl = math.ceil(windows[g]) + 1
  if lane == 'interactive' then
    redis.call('ZADD', KEYS[5], now, ARGV[5])
    redis.call('EXPIRE', KEYS[5], ttl)
  end
  if lane == 'batch' and ARGV[14] ~= '' then redis.call('HDEL', KEYS[9], ARGV[14]) end
  if producer ~= '' then
    redis.call('ZADD', ARGV[12] .. producer, now, ARGV[5])
    redis.call('EXPIRE', ARGV[12] .. producer, ttl)
  end
end
for i, rate in ipairs(rates) do
  if rate > 0 then
    redis.call('ZADD', KEYS[i + 1], now, ARGV[5])
    redis.call('EXPIRE', KEYS[i + 1], math.ceil(windows[i]) + 1)
  end
end
if cap > 0 then
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), ARGV[5])
  redis.call('EXPIRE', KEYS[4], math.ceil(tonumber(ARGV[4])) + 10)
end
return {1, '0'}
"""

_BLOCK_SLACK_MS = 1000
"""The closure key outlives its closed period by this much (the ``+ 1000`` of ``_BLOCK``'s PX)."""

_BLOCK = """
-- KEYS: blocked. ARGV: seconds. Extends, never shortens, the closed period.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local until_ = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > current then
  redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return 1
"""


@dataclass(frozen=True)
class Limits:
    """Per family requests/second (0: no limit), a total over all families, and a concurrency cap."""

    rates: Mapping[str, float] = field(default_factory=dict)
    total_rate: float = 0.0
    max_concurrent: int = 0
    lease_seconds: float = 60.0
    window_slack: float = 1.05
    """Windows are this much longer than the rate needs, so network jitter cannot show one call
    too many in a second upstream."""
    batch_share: float = 0.0
    """Share of a window kept for batch calls while batch calls are being turned away."""
    weights: Mapping[str, float] = field(default_factory=dict)
    """Producer -> its weight in the fair shares of a window (producers not named: ``other_weight``)."""
    other_weight: float = 1.0
    fair_horizon: float = 15.0
    """Seconds a producer turned away counts as waiting for its share (at least two windows)."""


@dataclass(frozen=True)
class Permit:
    """An admitted call; release it when the call is done (frees its concurrency slot)."""

    token: str


class UpstreamLimiter:
    """Admits upstream calls against the shared limits. Plain Python, one Redis round trip per call."""

    def __init__(self, client: redis.Redis, limits: Limits) -> None:
        self.redis = client
        self.limits = limits
        self._acquire = client.register_script(_ACQUIRE)
        self._weights = json.dumps(dict(limits.weights)) if limits.weights else "{}"
        self._block = client.register_script(_BLOCK)

    def acquire(
        self, family: str, lane: str = "", producer: str = "", caller: str = ""
    ) -> tuple[Permit | None, float]:
        """``(permit, 0)`` when the call may go now, else ``(None, seconds to wait)``.

        With a ``lane``, interactive calls leave ``batch_share`` of the window to batch calls while
        those are being turned away; with a ``producer``, a producer at its weighted share of the
        window waits while another one under its share is being turned away."""
        token = uuid.uuid4().hex
        if not self._limited(family):
            # Only the 429 closure applies. Its key lives exactly its closed period plus a second
            # (see _BLOCK), so its TTL, counted by Redis's clock like the script's TIME, tells the
            # rest of the closure: one PTTL instead of a script running TIME and GET.
            ttl_ms = int(self.redis.pttl(keys.LIMIT_BLOCKED))
            if ttl_ms == -1:  # a closure without a TTL is not one of ours: let the script judge it
                pass
            elif ttl_ms <= _BLOCK_SLACK_MS:
                return Permit(token), 0.0
            else:
                return None, max(0.001, (ttl_ms - _BLOCK_SLACK_MS) / 1000)
        ok, wait = self._acquire(
            keys=[
                keys.LIMIT_BLOCKED,
                keys.limit_window(family),
                keys.limit_window("*"),
                keys.LIMIT_SEMAPHORE,
                keys.limit_lane_window(family),
                keys.limit_batch_waiting(family),
                keys.limit_turned_away(family),
                keys.limit_batch_turn(family),
                keys.limit_batch_turns(family),
            ],
            args=[
                self.limits.rates.get(family, 0),
                self.limits.total_rate,
                self.limits.max_concurrent,
                self.limits.lease_seconds,
                token,
                self.limits.window_slack,
                lane,
                self.limits.batch_share,
                producer,
                self._weights,
                self.limits.other_weight,
                keys.limit_producer_window(family, ""),
                self.limits.fair_horizon,
                caller,
            ],
        )
        return (Permit(token), 0.0) if ok else (None, max(0.001, float(wait)))

    def _limited(self, family: str) -> bool:
        """Whether a rate or the concurrency cap applies to a call of ``family``."""
        limits = self.limits
        return bool(limits.rates.get(family, 0) or limits.total_rate or limits.max_concurrent > 0)

    def release(self, permit: Permit) -> None:
        if self.limits.max_concurrent > 0:
            self.redis.zrem(keys.LIMIT_SEMAPHORE, permit.token)

    def block(self, seconds: float) -> None:
        """Close the upstream for every worker for ``seconds`` (a 429's Retry-After)."""
        self._block(keys=[keys.LIMIT_BLOCKED], args=[max(0.0, seconds)])
