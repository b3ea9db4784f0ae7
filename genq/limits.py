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
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from genq import keys
from genq.ledger import as_text

RECENT = 10
"""Seconds of interactive calls that set the headroom batch submits leave them (``headroom`` in
``_PRELUDE``)."""

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
-- Slots of a window that batch submits leave free for interactive ones: as many as interactive
-- calls took per window over the last @RECENT@ seconds, rounded (at least one if any came), at most
-- what the batch share leaves them. An interactive job then finds room at once instead of waiting
-- its turn; what it costs batch work is the interactive calls made plus one slot kept free.
local function headroom(iwin, count, window, share)
  local recent = redis.call('ZCOUNT', iwin, now - @RECENT@, '+inf')
  if recent == 0 then return 0 end
  local want = math.max(1, math.floor(recent * window / @RECENT@ + 0.5))
  return math.min(want, count - math.floor(count * share))
end
"""

_ACQUIRE = """
-- KEYS: blocked (all families), family window, total window, semaphore, the family's interactive
--       window, batch-turned-away marker, the next free turn of a turned-away batch call, the turns
--       given (hash: caller -> when), admission grants (hash: caller -> until when), interactive and
--       batch producers with submits queued, admission state
-- ARGV: family rate, total rate, max concurrent, lease seconds, token, window slack (1.05), lane
--       ('interactive', 'batch' or ''), batch share, caller (a job id: keeps its turn when it comes
--       back; '' for none), '1' for a submit that waits in the admission queue when refused (see _TICK)
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
local capwait = 0
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= cap then
    local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    capwait = math.max(0.001, math.min(tonumber(first[2]) - now, 1.0))
  end
end
-- Lanes share the window that governs the call: its family's, else the total's.
local g = (rates[1] > 0 and 1) or (rates[2] > 0 and 2) or nil
local lane = ARGV[7]
local share = tonumber(ARGV[8])
if g then redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - math.max(windows[g], @RECENT@)) end
local queue = ARGV[10] == '1' and g ~= nil
if queue then
  local granted = tonumber(redis.call('HGET', KEYS[9], ARGV[9]) or '0')
  local held = 'grant:' .. ARGV[9]
  for i = 1, 2 do
    -- A grant whose place aged out of a window before its call came (its message was slow) holds
    -- nothing there any more: the call needs room like any other.
    if granted > 0 and counts[i] and not redis.call('ZSCORE', KEYS[i + 1], held)
        and redis.call('ZCARD', KEYS[i + 1]) >= counts[i] then
      granted = 0
    end
  end
  if granted >= now and capwait == 0 then
    -- The admission tick gave this submit its turn and took its place in the windows then; the call
    -- is made now, so its place moves to now (the upstream counts calls when they arrive).
    redis.call('HDEL', KEYS[9], ARGV[9])
    for i = 1, 2 do
      if counts[i] then redis.call('ZADD', KEYS[i + 1], now, held) end
    end
    if lane == 'interactive' then redis.call('ZADD', KEYS[5], now, held) end
    if cap > 0 then
      redis.call('ZADD', KEYS[4], now + tonumber(ARGV[4]), ARGV[5])
      redis.call('EXPIRE', KEYS[4], math.ceil(tonumber(ARGV[4])) + 10)
    end
    return {1, '0', held}
  end
  if granted > 0 and granted < now then redis.call('HDEL', KEYS[9], ARGV[9]) end
  -- Without a grant it goes now only when nothing of its lane or a higher one is queued and the
  -- window has room: batch submits leave the interactive headroom, interactive ones the batch share
  -- while batch submits are queued. Otherwise it joins the queue: nothing comes back to try again.
  wait = math.max(wait, capwait)
  local batch_queued = redis.call('EXISTS', KEYS[11]) == 1
  local ahead = redis.call('EXISTS', KEYS[10]) == 1 or (lane == 'batch' and batch_queued)
  if wait == 0 and not ahead then
    local used = redis.call('ZCARD', KEYS[g + 1])
    local inter = redis.call('ZCOUNT', KEYS[5], now - windows[g], '+inf')
    if lane == 'batch' then
      if used >= counts[g] - headroom(KEYS[5], counts[g], windows[g], share) then ahead = true end
    elseif batch_queued and inter >= counts[g] - math.floor(counts[g] * share) then
      ahead = true
    end
  end
  if wait > 0 or ahead then
    -- Refused: the wait returned is about how long the queue takes to reach it at the rate.
    local n = tonumber(redis.call('HGET', KEYS[12], 'n') or '0')
    return {0, tostring(math.max(wait, 0.001, (n + 1) * windows[g] / counts[g])), '1'}
  end
end
wait = math.max(wait, capwait)
local reserved = not queue and share > 0 and redis.call('EXISTS', KEYS[6]) == 1
if wait == 0 and g and lane == 'interactive' and reserved then
  -- Batch calls were turned away lately: interactive ones leave them their reserved share.
  local allowed = counts[g] - math.floor(counts[g] * share)
  if allowed < counts[g] and redis.call('ZCOUNT', KEYS[5], now - windows[g], '+inf') >= allowed then
    local oldest = redis.call('ZRANGEBYSCORE', KEYS[5], now - windows[g], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    wait = math.max(0.001, tonumber(oldest[2]) + windows[g] - now)
  end
end
if wait > 0 then
  if g and lane == 'batch' then
    redis.call('SET', KEYS[6], '1', 'PX', math.ceil(2000 * windows[g]))
    -- A turned-away batch call takes the next free turn of the rate (a virtual queue), so a backlog of
    -- thousands comes back about as fast as the rate admits, not all at once every window. One that
    -- came back at its turn and lost the slot (to interactive work) keeps its place at the front.
    local had = ARGV[9] ~= '' and tonumber(redis.call('HGET', KEYS[8], ARGV[9]) or '0') or 0
    if had == 0 or had > now + windows[g] then
      local turn = math.max(now + wait, tonumber(redis.call('GET', KEYS[7]) or '0')) + windows[g] / counts[g]
      redis.call('SET', KEYS[7], tostring(turn), 'PX', math.ceil(1000 * (turn - now + windows[g])))
      wait = turn - now
    end
    if ARGV[9] ~= '' then
      redis.call('HSET', KEYS[8], ARGV[9], tostring(now + wait))
      local keep = math.ceil(1000 * (wait + 2 * windows[g]))
      if redis.call('PTTL', KEYS[8]) < keep then redis.call('PEXPIRE', KEYS[8], keep) end
    end
  end
  return {0, tostring(wait)}
end
if g then
  local ttl = math.ceil(windows[g]) + 1
  if lane == 'interactive' then
    redis.call('ZADD', KEYS[5], now, ARGV[5])
    redis.call('EXPIRE', KEYS[5], math.max(ttl, @RECENT@ + 1))
  end
  if lane == 'batch' and ARGV[9] ~= '' then redis.call('HDEL', KEYS[8], ARGV[9]) end
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
return {1, '0', ARGV[5]}
"""

_WINDOWS = """
-- The rate windows of ARGV[1] (family) and ARGV[2] (total) rates in KEYS[2] and KEYS[3], as in
-- _ACQUIRE: calls each admits per window (counts), window lengths, and g, the one that governs lanes.
local rates = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local counts, windows, g = {}, {}, nil
for i, rate in ipairs(rates) do
  if rate > 0 then
    counts[i] = math.ceil(rate)
    windows[i] = counts[i] / rate * tonumber(ARGV[3])
    g = g or i
    redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', now - windows[i])
  end
end
"""

_PARK = """
-- KEYS: blocked (unused), family window, total window, admission state, tick, the lane's producers,
--       the producer's queue. ARGV: family rate, total rate, window slack, job id, step generation,
--       producer, lane, a token for a new tick.
-- Queues a refused submit (keeping its place if it is queued already: a re-driven job keeps its
-- turn, now for its new generation) and starts the tick when none is scheduled. Returns whether the
-- caller sends that tick.
local lane, producer = ARGV[7], ARGV[6]
redis.call('HSET', KEYS[4], 'gen:' .. ARGV[4], ARGV[5])
if redis.call('ZSCORE', KEYS[7], ARGV[4]) == false then
  redis.call('ZADD', KEYS[7], redis.call('HINCRBY', KEYS[4], 'seq', 1), ARGV[4])
  redis.call('HINCRBY', KEYS[4], 'n', 1)
end
if redis.call('ZSCORE', KEYS[6], producer) == false then
  -- Start-time fair queueing: a producer with nothing queued starts at the lane's virtual time.
  redis.call('ZADD', KEYS[6], tonumber(redis.call('HGET', KEYS[4], 'vt:' .. lane) or '0'), producer)
end
if redis.call('SET', KEYS[5], ARGV[8], 'NX', 'PX', @TICK_TTL_MS@) then return 1 end
return 0
"""

_TICK = """
-- KEYS: blocked, family window, total window, semaphore, the family's interactive window, admission
--       state, tick, grants, interactive producers, batch producers, grants by when they run out
-- ARGV: family rate, total rate, window slack, max concurrent, batch share, tick token, producer
--       queue key prefix, weights (JSON object), weight of producers not in it, job record key
--       prefix, seconds a grant holds, most grants per run, the next tick's token, the share of a
--       window granted per run
-- One admission tick: gives the queued submits the room the windows have now, interactive before
-- batch (batch keeping its share, leaving the interactive headroom), producers within a lane by
-- start-time fair queueing on their weights, then schedules itself for when a slot next frees, under
-- a new token: a duplicate or redelivered message of this run then finds its chain superseded.
-- Returns {seconds to the next tick or -1, then job id, generation, lane per grant}.
if redis.call('GET', KEYS[7]) ~= ARGV[6] then return {-1} end  -- another tick took over
-- Turns that ran out untaken leave the grants hash: a job that ended before its turn came (cancelled,
-- over budget) never asks for it, and only its own call would have removed it.
local stale = redis.call('ZRANGEBYSCORE', KEYS[11], '-inf', now, 'LIMIT', 0, 500)
if #stale > 0 then
  redis.call('HDEL', KEYS[8], unpack(stale))
  redis.call('ZREM', KEYS[11], unpack(stale))
end
local blocked = tonumber(redis.call('GET', KEYS[1]) or '0')
local free = g and counts[g] or 0
for i = 1, 2 do
  if counts[i] then free = math.min(free, counts[i] - redis.call('ZCARD', KEYS[i + 1])) end
end
local cap = tonumber(ARGV[4])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  free = math.min(free, cap - redis.call('ZCARD', KEYS[4]))
end
if blocked > now then free = 0 end
local share = tonumber(ARGV[5])
local weights = cjson.decode(ARGV[8])
local used = g and redis.call('ZCARD', KEYS[g + 1]) or 0
local inter = g and redis.call('ZCOUNT', KEYS[5], now - windows[g], '+inf') or 0
local out = {1}
local grants = 0
local keep = g and headroom(KEYS[5], counts[g], windows[g], share) or 0
-- Turns go out paced at the rate, a share of the window at a time (ARGV[14]): a whole window granted
-- at once reaches the upstream as one burst, and jitter in delivery could then put two windows'
-- bursts in one second there. The pace is a bucket of credit filling at the rate and holding two
-- shares, so a run that comes late (its worker was busy) catches up and the long-run rate is kept.
local share_n = g and math.max(1, math.ceil(counts[g] * tonumber(ARGV[14]))) or 1
local pace = g and counts[g] / windows[g] or 1
local last = tonumber(redis.call('HGET', KEYS[6], 'tick_at') or '0')
local credit = tonumber(redis.call('HGET', KEYS[6], 'credit') or tostring(2 * share_n))
credit = math.min(2 * share_n, credit + math.max(0, now - last) * pace)
local most = math.min(math.floor(credit), tonumber(ARGV[12]))
while free > 0 and grants < most do
  local iq = redis.call('EXISTS', KEYS[9]) == 1
  local bq = redis.call('EXISTS', KEYS[10]) == 1
  -- Batch under its share goes first; then interactive; then batch within the headroom.
  local lane
  if bq and used - inter < math.floor(counts[g] * share) then lane = 'batch'
  elseif iq then lane = 'interactive'
  elseif bq and used < counts[g] - keep then lane = 'batch'
  else break end
  local pkey = lane == 'interactive' and KEYS[9] or KEYS[10]
  local top = redis.call('ZRANGE', pkey, 0, 0, 'WITHSCORES')
  local producer, vt = top[1], tonumber(top[2])
  local qkey = ARGV[7] .. lane .. ':' .. producer
  local id = redis.call('ZRANGE', qkey, 0, 0)[1]
  if id then
    redis.call('ZREM', qkey, id)
    redis.call('HINCRBY', KEYS[6], 'n', -1)
  end
  local finish = vt + 1 / tonumber(weights[producer] or ARGV[9])
  if redis.call('EXISTS', qkey) == 1 then redis.call('ZADD', pkey, finish, producer)
  else redis.call('ZREM', pkey, producer) end
  redis.call('HSET', KEYS[6], 'vt:' .. lane, tostring(vt))
  if id then
    local gen = redis.call('HGET', KEYS[6], 'gen:' .. id) or '0'
    redis.call('HDEL', KEYS[6], 'gen:' .. id)
    local rec = redis.call('HMGET', ARGV[10] .. id, 'state', 'poll_gen')
    -- A job that moved on since it was queued (re-driven, cancelled, expired) drops its place.
    if rec[1] == 'pending' and (rec[2] or '0') == gen then
      local token = 'grant:' .. id
      redis.call('HSET', KEYS[8], id, tostring(now + tonumber(ARGV[11])))
      redis.call('ZADD', KEYS[11], now + tonumber(ARGV[11]), id)
      for i = 1, 2 do
        if counts[i] then
          redis.call('ZADD', KEYS[i + 1], now, token)
          redis.call('EXPIRE', KEYS[i + 1], math.ceil(windows[i]) + 1)
        end
      end
      if lane == 'interactive' then
        redis.call('ZADD', KEYS[5], now, token)
        redis.call('EXPIRE', KEYS[5], math.ceil(windows[g]) + @RECENT@ + 1)
        inter = inter + 1
      end
      used, free, grants = used + 1, free - 1, grants + 1
      table.insert(out, id)
      table.insert(out, gen)
      table.insert(out, lane)
    end
  end
end
if redis.call('EXISTS', KEYS[9]) == 0 and redis.call('EXISTS', KEYS[10]) == 0 then
  redis.call('DEL', KEYS[7])
  out[1] = -1
  return out
end
-- Next when room comes: a full window's oldest call ages out (a window held back by the headroom or
-- the batch share grows room the same way), a lease of the concurrency cap may have ended, or the
-- upstream reopens; when the pace held this run back, once the next share's credit is there.
credit = credit - grants
redis.call('HSET', KEYS[6], 'tick_at', tostring(now), 'credit', tostring(credit))
local wake = now
if grants >= most and g then
  wake = now + math.max(0, share_n - credit) / pace  -- when the next share's credit is there
elseif g then
  local full = false
  for i = 1, 2 do
    if counts[i] and (redis.call('ZCARD', KEYS[i + 1]) >= counts[i] or (i == g and free > 0)) then
      full = true
      local oldest = redis.call('ZRANGE', KEYS[i + 1], 0, 0, 'WITHSCORES')
      if oldest[2] then wake = math.max(wake, tonumber(oldest[2]) + windows[i]) end
    end
  end
  if not full and cap > 0 then wake = now + 0.25 end
end
wake = math.max(wake, blocked, now + 0.002)
redis.call('SET', KEYS[7], ARGV[13], 'PX', math.ceil((wake - now) * 1000) + @TICK_TTL_MS@)
out[1] = tostring(wake - now)
return out
"""

_REARM = """
-- KEYS: tick, interactive producers, batch producers. ARGV: a token for a new tick.
-- The sweeper's check that a queue with submits in it has a tick (its message may have been lost).
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', @TICK_TTL_MS@) then return 1 end
return 0
"""

TICK_TTL_MS = 30_000
"""A scheduled tick's token outlives its time by this much; past it a lost tick is started again."""

GRANT_SECONDS = 60.0
"""How long a submit's granted turn waits for its message (sent at once, ahead of batch work)."""

MAX_GRANTS = 200
"""Most grants per tick run, whatever the rate, so one script never runs long."""


def _opening_keys(family: str) -> list[str]:
    """KEYS[1..3] of every limiter script: the 429 closure, the family's window and the total one."""
    return [keys.LIMIT_BLOCKED, keys.limit_window(family), keys.limit_window("*")]


def _script(*parts: str) -> str:
    return "".join(parts).replace("@RECENT@", str(RECENT)).replace("@TICK_TTL_MS@", str(TICK_TTL_MS))


_SENT = """
-- KEYS: family window, total window. ARGV: the call's member in the windows.
-- Moves the call's place in the windows to now, the time it is sent (if it is still there).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 1, 2 do redis.call('ZADD', KEYS[i], 'XX', now, ARGV[1]) end
return 1
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
    tick_share: float = 0.1
    """Share of a window the admission tick grants per run (at least one turn): turns go out paced at
    the rate, not a window at a time."""


def admission_queued(client: redis.Redis, family: str = "trigger") -> dict[tuple[str, str], int]:
    """Submits waiting in ``family``'s admission queue for a turn, by lane and producer."""
    admit = keys.admit_prefix(family)
    pairs = [
        (lane, as_text(producer))
        for lane in ("interactive", "batch")
        for producer in client.zrange(f"{admit}:p:{lane}", 0, -1)
    ]
    pipe = client.pipeline(transaction=False)
    for lane, producer in pairs:
        pipe.zcard(f"{admit}:q:{lane}:{producer}")
    return dict(zip(pairs, (int(n) for n in pipe.execute()), strict=True))


@dataclass(frozen=True)
class Grant:
    """A queued submit's turn: send its message now."""

    job_id: str
    gen: int
    lane: str


@dataclass(frozen=True)
class Tick:
    """What one admission tick did: the turns it granted, and when the next tick runs."""

    grants: list[Grant]
    next_in: float | None
    """Seconds to the next tick; ``None`` when the queue is empty."""
    token: str = ""
    """The next tick's token. Each run hands the chain a new one, so that of two deliveries of one
    tick message (a redelivery, a duplicate) only the first goes on."""


@dataclass(frozen=True)
class Permit:
    """An admitted call; say when it is :meth:`~UpstreamLimiter.sent`, and release it when it is done
    (frees its concurrency slot)."""

    token: str
    window: str = ""
    """Its member in the rate windows ('' when no rate applied)."""
    family: str = ""
    since: float = 0.0
    """``time.monotonic()`` before its admission was asked."""


class UpstreamLimiter:
    """Admits upstream calls against the shared limits. Plain Python, one Redis round trip per call."""

    def __init__(self, client: redis.Redis, limits: Limits) -> None:
        self.redis = client
        self.limits = limits
        self._acquire = client.register_script(_script(_PRELUDE, _ACQUIRE))
        self._park = client.register_script(_script(_PRELUDE, _WINDOWS, _PARK))
        self._tick = client.register_script(_script(_PRELUDE, _WINDOWS, _TICK))
        self._rearm = client.register_script(_script(_REARM))
        self._weights = json.dumps(dict(limits.weights)) if limits.weights else "{}"
        self._block = client.register_script(_BLOCK)
        self._sent = client.register_script(_SENT)

    def acquire(self, family: str, lane: str = "", caller: str = "") -> tuple[Permit | None, float]:
        """``(permit, 0)`` when the call may go now, else ``(None, seconds to wait)``.

        With a ``lane``, interactive calls leave ``batch_share`` of the window to batch calls while
        those are being turned away. (Producers share a window in the admission queue, :meth:`park`.)"""
        permit, wait, _ = self.admit(family, lane, caller)
        return permit, wait

    def queues(self, family: str) -> bool:
        """Whether refused calls of ``family`` wait in its admission queue (a rate applies to it)."""
        return bool(self.limits.rates.get(family, 0) or self.limits.total_rate)

    def admit(
        self, family: str, lane: str = "", caller: str = "", queue: bool = False
    ) -> tuple[Permit | None, float, bool]:
        """:meth:`acquire`, and for a submit (``queue``, with its job id as ``caller``) the admission
        queue: it goes with a turn the tick granted, or when nothing is queued ahead of it and the
        window has room; otherwise the third value says to :meth:`park` it rather than retry."""
        token, since = uuid.uuid4().hex, time.monotonic()
        queue = queue and bool(caller) and self.queues(family)
        if not self._limited(family):
            # Only the 429 closure applies. Its key lives exactly its closed period plus a second
            # (see _BLOCK), so its TTL, counted by Redis's clock like the script's TIME, tells the
            # rest of the closure: one PTTL instead of a script running TIME and GET.
            ttl_ms = int(self.redis.pttl(keys.LIMIT_BLOCKED))
            if ttl_ms == -1:  # a closure without a TTL is not one of ours: let the script judge it
                pass
            elif ttl_ms <= _BLOCK_SLACK_MS:
                return Permit(token), 0.0, False
            else:
                return None, max(0.001, (ttl_ms - _BLOCK_SLACK_MS) / 1000), False
        admit = keys.admit_prefix(family)
        ok, wait, *queued = self._acquire(
            keys=[
                *_opening_keys(family),
                keys.LIMIT_SEMAPHORE,
                keys.limit_lane_window(family),
                keys.limit_batch_waiting(family),
                keys.limit_batch_turn(family),
                keys.limit_batch_turns(family),
                f"{admit}:grants",
                f"{admit}:p:interactive",
                f"{admit}:p:batch",
                f"{admit}:state",
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
                caller,
                "1" if queue else "",
            ],
        )
        if ok:
            window = as_text(queued[0]) if queued and self.queues(family) else ""
            return Permit(token, window, family, since), 0.0, False
        return None, max(0.001, float(wait)), bool(queued) and as_text(queued[0]) == "1"

    def waiting_ahead(self, family: str, lane: str) -> float | None:
        """For a new submit of ``lane``: about how many seconds the queue ahead of it takes at the rate,
        when submits of its lane or a higher one are already waiting their turn; else None (it may
        find room at once). One round trip that writes nothing. It is a hint: the queue may empty
        meanwhile, and a submit parked then is granted by the next tick."""
        rate = self.limits.rates.get(family, 0) or self.limits.total_rate
        if not rate:
            return None
        admit = keys.admit_prefix(family)
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(f"{admit}:p:interactive")
        pipe.exists(f"{admit}:p:batch")
        pipe.hget(f"{admit}:state", "n")
        interactive, batch, n = pipe.execute()
        if not (interactive or (lane == "batch" and batch)):
            return None
        return (int(n or 0) + 1) * self.limits.window_slack / rate

    def park(self, family: str, job_id: str, gen: int, lane: str, producer: str) -> str | None:
        """Queue a refused submit for its turn (it keeps its place if it is queued already). Returns a
        new tick's token to send when no tick was scheduled."""
        admit = keys.admit_prefix(family)
        token = uuid.uuid4().hex
        started = self._park(
            keys=[
                *_opening_keys(family),
                f"{admit}:state",
                f"{admit}:tick",
                f"{admit}:p:{lane}",
                f"{admit}:q:{lane}:{producer}",
            ],
            args=[*self._rates(family), job_id, gen, producer, lane, token],
        )
        return token if int(started) else None

    def tick(self, family: str, token: str) -> Tick:
        """Grant the queued submits the room the windows have now; the next tick's delay and token, if
        any."""
        admit = keys.admit_prefix(family)
        following = uuid.uuid4().hex
        out = self._tick(
            keys=[
                *_opening_keys(family),
                keys.LIMIT_SEMAPHORE,
                keys.limit_lane_window(family),
                f"{admit}:state",
                f"{admit}:tick",
                f"{admit}:grants",
                f"{admit}:p:interactive",
                f"{admit}:p:batch",
                f"{admit}:grants-until",
            ],
            args=[
                *self._rates(family),
                self.limits.max_concurrent,
                self.limits.batch_share,
                token,
                f"{admit}:q:",
                self._weights,
                self.limits.other_weight,
                keys.JOB_PREFIX,
                GRANT_SECONDS,
                MAX_GRANTS,
                following,
                self.limits.tick_share,
            ],
        )
        delay = float(as_text(out[0]))
        rest = [as_text(x) for x in out[1:]]
        grants = [Grant(rest[i], int(rest[i + 1]), rest[i + 2]) for i in range(0, len(rest), 3)]
        return Tick(grants, None, "") if delay < 0 else Tick(grants, delay, following)

    def rearm(self, family: str) -> str | None:
        """A new tick's token when submits are queued and no tick is scheduled (its message was lost)."""
        admit = keys.admit_prefix(family)
        token = uuid.uuid4().hex
        started = self._rearm(
            keys=[f"{admit}:tick", f"{admit}:p:interactive", f"{admit}:p:batch"], args=[token]
        )
        return token if int(started) else None

    def _rates(self, family: str) -> tuple[float, float, float]:
        return self.limits.rates.get(family, 0), self.limits.total_rate, self.limits.window_slack

    def _limited(self, family: str) -> bool:
        """Whether a rate or the concurrency cap applies to a call of ``family``."""
        limits = self.limits
        return bool(limits.rates.get(family, 0) or limits.total_rate or limits.max_concurrent > 0)

    def sent(self, permit: Permit) -> None:
        """The call is about to be sent. The windows' slack (``window_slack``) absorbs the time from
        admission to arrival upstream; a worker starved of CPU after its admission can take longer,
        and a call admitted a window later could then reach the upstream within a second of this one.
        So when more than half the slack has passed, the call's place moves to now. Timed on this
        host's clock from before the admission was asked: no Redis call in the usual case."""
        if permit.window and time.monotonic() - permit.since > self._absorbs(permit.family):
            self._sent(keys=_opening_keys(permit.family)[1:], args=[permit.window])

    def _absorbs(self, family: str) -> float:
        """Half the slack of the shortest window that applies to ``family``, in seconds."""
        slack = self.limits.window_slack - 1
        rates = [r for r in (self.limits.rates.get(family, 0), self.limits.total_rate) if r]
        return min((math.ceil(r) / r * slack / 2 for r in rates), default=0.0)

    def release(self, permit: Permit) -> None:
        if self.limits.max_concurrent > 0:
            self.redis.zrem(keys.LIMIT_SEMAPHORE, permit.token)

    def block(self, seconds: float) -> None:
        """Close the upstream for every worker for ``seconds`` (a 429's Retry-After)."""
        self._block(keys=[keys.LIMIT_BLOCKED], args=[max(0.0, seconds)])
