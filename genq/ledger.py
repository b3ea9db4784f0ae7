"""The Redis ledger: the source of truth for every job.

Each job is a hash (:func:`genq.keys.job`). It changes only through :meth:`Ledger.transition`, a
compare-and-set done by one Lua script, which also appends the change to the event stream, keeps the
due-time index the sweeper reads, and keeps per-state counts. Broker messages are only reminders: a
task that finds the record in an unexpected state does nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import redis

from genq import keys
from genq.clock import Clock, RedisClock
from genq.schemas import POLLING_STATES, TERMINAL_STATES, JobKind, JobRecord, JobState, OutputFile

KEEP: Final = object()
"""``due_at`` value: leave the job's due time as it is."""

_TRANSITION = """
-- KEYS: job, events, due, counts, callbacks due, expiring
-- ARGV: id, from (comma list), to, now, expect_gen, due ('' keep, '-' drop, else score), ttl,
--       callback due score (used when the job ends and has a callback), parent must be live ('1'/''),
--       budget plan (JSON, '' for none: see genq.budgets), 'refund' when a job leaving submitting
--       was surely not acted on upstream, fields...
local terminal = @TERMINAL@
-- One read and one write of the record per step: every field this script needs comes in one HMGET,
-- and every field it sets goes out in one HSET (Redis runs the script atomically either way).
local rec = redis.call('HMGET', KEYS[1], 'state', 'poll_gen', 'kind', 'parent_id', 'callback',
                    'callback_state', 'producer', 'charge')
local cur = rec[1]
if not cur then return {0, '', 'missing'} end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return {0, cur, 'state'} end
if ARGV[5] ~= '' and rec[2] ~= ARGV[5] then return {0, cur, 'stale'} end
local kind = rec[3]
local parent = rec[4] or ''
if ARGV[9] == '1' and parent ~= '' then
  -- Checked in the same step as the move, so a cancel of the workflow cannot slip in between.
  local ps = redis.call('HGET', '@JOB_PREFIX@' .. parent, 'state')
  if ps == false or terminal[ps] then return {0, cur, 'parent'} end
end
local set = {'state', ARGV[3], 'updated_at', ARGV[4]}
if ARGV[10] ~= '' then
  -- The budgets are checked and charged in the same step as the claim on the POST, so no number of
  -- concurrent submits can pass a cap. Checks: {key, field, cap, add, name, window end}.
  local plan = cjson.decode(ARGV[10])
  -- The total's window of a period is kept only while a total cap is set for it (a report adds up
  -- the producers' windows otherwise). Kept from the middle of a window (a cap just set), it starts
  -- from what the producers' windows hold, so a cap set at noon counts the morning's spend too.
  for _, w in ipairs(plan.seed or {}) do
    if redis.call('EXISTS', w[1]) == 0 then
      local t, c = 0, 0
      for _, p in ipairs(redis.call('SMEMBERS', '@PRODUCERS@')) do
        local got = redis.call('HMGET', w[2] .. p .. w[3], 't', 'c')
        t = t + tonumber(got[1] or '0')
        c = c + tonumber(got[2] or '0')
      end
      redis.call('HSET', w[1], 't', t, 'c', c)
      redis.call('EXPIRE', w[1], w[4])
    end
  end
  for _, c in ipairs(plan.checks) do
    local used = tonumber(redis.call('HGET', c[1], c[2]) or '0')
    if used + c[4] > c[3] + 1e-9 then
      -- Charged POSTs still unanswered may yet be refunded: wait for them rather than reject.
      local open = tonumber(redis.call('HGET', c[1], 'p' .. c[2]) or '0')
      if open > 1e-9 and used - open + c[4] <= c[3] + 1e-9 then return {0, cur, 'unsettled', c[5], '0'} end
      return {0, cur, 'budget', c[5], tostring(c[6])}
    end
  end
  local q = plan.quota
  if q and redis.call('SCARD', q[1]) >= q[2] and redis.call('SISMEMBER', q[1], ARGV[1]) == 0 then
    return {0, cur, 'quota', q[3], '0'}
  end
  -- Charge: {key, cost, ttl, pending cost tracked}. Every submit pays for these commands, so each
  -- is made only where it counts: the TTL and the producer's name once per window, the cost when
  -- there is one, the unanswered cost only where a cost cap may have to wait for it.
  for _, e in ipairs(plan.charge) do
    if redis.call('HINCRBY', e[1], 't', 1) == 1 then
      redis.call('EXPIRE', e[1], e[3])
      redis.call('SADD', '@PRODUCERS@', plan.producer)
    end
    redis.call('HINCRBY', e[1], 'pt', 1)
    if e[2] ~= 0 then redis.call('HINCRBYFLOAT', e[1], 'c', e[2]) end
    if e[4] == 1 then redis.call('HINCRBYFLOAT', e[1], 'pc', e[2]) end
  end
  set[#set + 1] = 'charge'
  set[#set + 1] = cjson.encode(plan.charge)
  redis.call('SADD', '@INFLIGHT@' .. plan.producer, ARGV[1])
end
-- The callback fields as they will be after this step's fields are written.
local callback, cs = rec[5] or '', rec[6] or ''
for i = 12, #ARGV, 2 do
  set[#set + 1] = ARGV[i]
  set[#set + 1] = ARGV[i + 1]
  if ARGV[i] == 'callback' then callback = ARGV[i + 1]
  elseif ARGV[i] == 'callback_state' then cs = ARGV[i + 1] end
end
if terminal[ARGV[3]] or ARGV[3] == 'pending' or ARGV[3] == 'parked' then
  -- No longer in flight: its producer's quota has room again.
  local producer = rec[7]
  if producer and producer ~= '' then redis.call('SREM', '@INFLIGHT@' .. producer, ARGV[1]) end
end
if cur == 'submitting' and ARGV[3] ~= 'submitting' then
  -- The POST was answered (or given up on): its charge is settled, or refunded when the upstream
  -- surely did not act on it. An ambiguous ending keeps it: the money may have been spent.
  local charge = rec[8]
  if charge and charge ~= '' then
    for _, e in ipairs(cjson.decode(charge)) do
      if redis.call('HINCRBY', e[1], 'pt', -1) >= 0 then
        -- (A charge made before `tracked` existed has three fields, and tracked its cost.)
        if e[4] ~= 0 then redis.call('HINCRBYFLOAT', e[1], 'pc', -e[2]) end
        if ARGV[11] == 'refund' then
          redis.call('HINCRBY', e[1], 't', -1)
          if e[2] ~= 0 then redis.call('HINCRBYFLOAT', e[1], 'c', -e[2]) end
        end
      elseif redis.call('HLEN', e[1]) == 1 then
        -- The window expired while the POST was out: the decrement made a key of its own, without a TTL.
        redis.call('DEL', e[1])
      else
        redis.call('HINCRBY', e[1], 'pt', 1)
      end
    end
    -- Cleared in the step's one HSET: an empty charge is no charge.
    set[#set + 1] = 'charge'
    set[#set + 1] = ''
  end
end
local callback_due = false
if ARGV[7] ~= '' and callback ~= '' then
  if cs == '' then
    -- Recorded in the same step as the ending, so a crash right after cannot lose the callback.
    set[#set + 1] = 'callback_state'
    set[#set + 1] = 'pending'
    redis.call('ZADD', KEYS[5], ARGV[8], ARGV[1])
    cs = 'pending'
  end
  callback_due = cs == 'pending'
end
redis.call('HSET', KEYS[1], unpack(set))
if ARGV[6] == '-' then redis.call('ZREM', KEYS[3], ARGV[1])
elseif ARGV[6] ~= '' then redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1]) end
if ARGV[7] ~= '' then
  -- The outputs' URLs (signed, with their tokens) are of no use once the job has ended.
  redis.call('DEL', KEYS[1] .. ':urls')
  if not callback_due then
    -- A record whose callback is still due starts its TTL once it is settled (callback_attempted).
    redis.call('EXPIRE', KEYS[1], ARGV[7])
    -- So the listing index can drop the id when the record expires (see TRIM).
    redis.call('ZADD', KEYS[6], tonumber(ARGV[4]) + tonumber(ARGV[7]), ARGV[1])
  end
elseif terminal[cur] then
  -- Brought back from an ending (resubmit): the record lives again until its next ending.
  redis.call('PERSIST', KEYS[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
end
if cur ~= ARGV[3] then
  -- One count per move, not one per state left and entered: see state_counts.
  redis.call('HINCRBY', KEYS[4], kind .. ':' .. cur .. '>' .. ARGV[3], 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', '@MAXLEN@', '*', 'job', ARGV[1], 'kind', kind,
             'from', cur, 'to', ARGV[3], 'at', ARGV[4], 'parent', parent)
end
return {1, cur, 'ok'}
"""


def state_counts(raw: Mapping[Any, Any]) -> dict[str, int]:
    """``<kind>:<state>`` -> jobs in it, from the counts hash (:data:`genq.keys.COUNTS`).

    The hash counts moves, ``<kind>:<from>><to>`` (``<from>`` empty for a new record): a step then
    costs one HINCRBY instead of two, and a state holds what came in less what went out. A field
    without ``>`` is a state's own count, as versions before moves were counted kept it."""
    counts: dict[str, int] = {}
    for field, value in raw.items():
        kind, _, move = as_text(field).partition(":")
        source, arrow, target = move.partition(">")
        n = int(value)
        if not arrow:  # a state's own count
            counts[f"{kind}:{source}"] = counts.get(f"{kind}:{source}", 0) + n
            continue
        counts[f"{kind}:{target}"] = counts.get(f"{kind}:{target}", 0) + n
        if source:
            counts[f"{kind}:{source}"] = counts.get(f"{kind}:{source}", 0) - n
    return counts


def _lua_set(values: Iterable[str]) -> str:
    return "{" + ", ".join(f"['{v}'] = true" for v in sorted(values)) + "}"


_TRANSITION = (
    _TRANSITION.replace("@MAXLEN@", str(keys.EVENTS_MAXLEN))
    .replace("@JOB_PREFIX@", keys.JOB_PREFIX)
    .replace("@INFLIGHT@", keys.INFLIGHT_PREFIX)
    .replace("@PRODUCERS@", keys.PRODUCERS)
    .replace("@TERMINAL@", _lua_set(s.value for s in TERMINAL_STATES))
)

_CREATE = """
-- KEYS: job, events, jobs, due, counts, idem ('' when none), model ('' when none), model's parked set
-- ARGV: id, kind, now, due, maxlen, idem_ttl, parent, fields...
if KEYS[6] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing then return {0, existing, ''} end
end
-- A record is never written over: a by-name request resent after its idempotency key expired derives
-- the same job id, and must find its job, not start it again.
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, ARGV[1], ''} end
if KEYS[6] ~= '' then redis.call('SET', KEYS[6], ARGV[1], 'EX', ARGV[6]) end
local state = 'pending'
if KEYS[7] ~= '' then
  -- Checked in the same script that parks, so a model turning ready cannot strand a job.
  local ms = redis.call('HGET', KEYS[7], 'state')
  if ms == 'requested' or ms == 'training' then
    state = 'parked'
    redis.call('SADD', KEYS[8], ARGV[1])
  end
end
-- One HSET for the whole record; 'state' last, so it wins over a field of that name.
local set = {}
for i = 8, #ARGV do set[#set + 1] = ARGV[i] end
set[#set + 1] = 'state'
set[#set + 1] = state
redis.call('HSET', KEYS[1], unpack(set))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[2] .. ':>' .. state, 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'job', ARGV[1], 'kind', ARGV[2],
           'from', '', 'to', state, 'at', ARGV[3], 'parent', ARGV[7])
return {1, ARGV[1], state}
"""

CLAIM_DUE = """
-- KEYS: due index. ARGV: now, limit, grace, record key prefix, states that get a new step generation
-- (comma list). Records are read by prefix: this ledger is one Redis, not a cluster.
-- Claims what is due: pushes it forward (so the next sweep does not claim it again) and, for a job in
-- one of the listed states, starts a new step generation so that any late message of the old chain
-- is stale. The push grows with the time the record has not moved (up to ten graces): a job held up
-- behind a long queue is re-driven ever less often instead of once per grace, so a backlog cannot
-- feed on itself.
-- ARGV[6], ARGV[7]: when the oldest submit message still waiting in the interactive and the batch
-- lane's queue was sent ('' when none or unknown); ARGV[9], ARGV[10] the same for the poll queue. A
-- pending job whose submit was sent since (a polled job whose poll was), by its last move or claim,
-- is still in that queue, not lost: it is only pushed forward, so its waiting message stays the live
-- one. A claim that starts a new generation records its time ('claimed_at') for this; its message
-- counts as sent up to a grace later. A lost one is then re-driven once the queue has moved that far
-- past it (or emptied).
-- ARGV[8]: the look-ahead, seconds ('' or absent: none; below the grace). A record in one of the
-- listed states (a message chain: its claim starts a new generation) due before now + look-ahead is
-- claimed already, so that its message can be sent with a countdown to its due time instead of waiting
-- for the next sweep; any other record (and a workflow's) only once it is due. The push is counted
-- from the due time when that is still ahead, so the grace runs from when the step is really due.
-- Returns, per record claimed: id, state, generation, kind, lane, due score.
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local grace = tonumber(ARGV[3])
local horizon = now + (tonumber(ARGV[8] or '') or 0)
local bump = {}
for s in string.gmatch(ARGV[5], '[^,]+') do bump[s] = true end
local since = {pending = {interactive = tonumber(ARGV[6]), batch = tonumber(ARGV[7])}}
local polls = {interactive = tonumber(ARGV[9] or ''), batch = tonumber(ARGV[10] or '')}
for s in string.gmatch('@POLLING@', '[^,]+') do since[s] = polls end
local out = {}
local claimed = 0
-- Records not yet due that are not claimed early stay where they are, ahead of the rest in the range:
-- the next page starts past them. Everything claimed moves past the horizon (pushed at least a grace).
local skipped = 0
local scanned = 0
while claimed < limit and scanned < 10 * limit do
  local page = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon, 'WITHSCORES', 'LIMIT', skipped,
                          limit - claimed)
  if #page == 0 then break end
  for i = 1, #page, 2 do
    local id = page[i]
    local at = tonumber(page[i + 1])
    local key = ARGV[4] .. id
    local rec = redis.call('HMGET', key, 'state', 'poll_gen', 'updated_at', 'kind', 'lane', 'claimed_at')
    local state = rec[1]
    local base = math.max(now, at)
    local queued = false
    local lanes = since[state or '']
    if lanes then
      local oldest = lanes[rec[5] == 'batch' and 'batch' or 'interactive']
      -- The margin covers the clocks: the record's is Redis's, the stamp the sender's wall clock. A
      -- claim's message goes out while the sweep sends the others (seconds, for thousands): a grace.
      local sent = math.max(tonumber(rec[3] or '0') + @MARGIN@, tonumber(rec[6] or '0') + grace)
      queued = oldest ~= nil and sent >= oldest
    end
    scanned = scanned + 1
    if not state then
      redis.call('ZREM', KEYS[1], id)
    elseif at > now and (not bump[state] or rec[4] == '@WORKFLOW@') then
      skipped = skipped + 1
    elseif queued then
      redis.call('ZADD', KEYS[1], base + grace, id)
    else
      local gen = tonumber(rec[2] or '0')
      if bump[state] then
        gen = redis.call('HINCRBY', key, 'poll_gen', 1)
        redis.call('HSET', key, 'claimed_at', now)
      end
      local idle = now - tonumber(rec[3] or now)
      redis.call('ZADD', KEYS[1], base + math.max(grace, math.min(idle, 10 * grace)), id)
      claimed = claimed + 1
      table.insert(out, id)
      table.insert(out, state)
      table.insert(out, tostring(gen))
      table.insert(out, rec[4] or '')
      table.insert(out, rec[5] or '')
      table.insert(out, page[i + 1])
    end
  end
end
return out
"""

CLAIM_FIELDS = 6
"""Values CLAIM_DUE returns per claimed record: id, state, generation, kind, lane, due score."""

QUEUED_MARGIN = 2.0
"""Seconds of clock difference allowed between a record's ``updated_at`` (Redis's clock) and the
``genq_sent_at`` stamp of its message (the sender's wall clock) when telling whether it is still queued."""
CLAIM_DUE = (
    CLAIM_DUE.replace("@MARGIN@", repr(QUEUED_MARGIN))
    .replace("@WORKFLOW@", JobKind.WORKFLOW.value)
    .replace("@POLLING@", ",".join(sorted(s.value for s in POLLING_STATES)))
)


class QueuedSince(NamedTuple):
    """When the oldest message still waiting in each lane's list of a queue was sent (see
    :mod:`genq.backlog`); None: none waiting, or unknown."""

    interactive: float | None = None
    batch: float | None = None


NOTHING_QUEUED = QueuedSince()

_TRIM = """
-- KEYS: expiring, jobs, due, callbacks due. ARGV: now, limit, record key prefix.
-- Drops from every index the ids whose records have expired, so no index outlives its records.
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))) do
  if redis.call('EXISTS', ARGV[3] .. id) == 0 then
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('ZREM', KEYS[1], id)
    n = n + 1
  else
    -- Not gone yet (Redis expires lazily, a little after the TTL): look again a minute later.
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + 60, id)
  end
end
return n
"""

_RECORD_OUTPUT = """
-- KEYS: job. ARGV: field, json, now. Returns outputs still missing, or -1 if not downloading.
local rec = redis.call('HMGET', KEYS[1], 'state', 'expected_outputs')
if rec[1] ~= 'downloading' then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'updated_at', ARGV[3])
-- Outputs are stored one field each and the record has a few dozen fields: counting them here is
-- cheaper than a counter that a re-recorded output would have to know not to bump.
local have = 0
for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(k, 1, 4) == 'out:' then have = have + 1 end
end
return tonumber(rec[2]) - have
"""


SCAN_CAP = 20_000


@dataclass(frozen=True)
class JobEvent:
    """One state transition from the event stream."""

    stream_id: str
    job_id: str
    kind: str
    from_state: str
    to_state: str
    at: float
    parent_id: str | None

    @classmethod
    def from_stream(cls, stream_id: str, fields: dict[str, str]) -> JobEvent:
        return cls(
            stream_id,
            fields.get("job", ""),
            fields.get("kind", ""),
            fields.get("from", ""),
            fields.get("to", ""),
            float(fields.get("at") or 0),
            fields.get("parent") or None,
        )


@dataclass(frozen=True)
class Created:
    """The outcome of :meth:`Ledger.create`: ``state`` is None when an idempotency key matched."""

    id: str
    created: bool
    state: JobState | None


@dataclass(frozen=True)
class Claimed:
    """A job the sweeper claimed: its state and step generation as of the claim, its kind, whether it
    is in the batch lane, and when it is due (Unix time, the ledger's clock: a job claimed ahead of
    time is due after the claim)."""

    id: str
    state: JobState
    gen: int
    kind: str
    batch: bool = False
    due: float = 0.0


CHAINED_STATES = frozenset({JobState.PENDING, *POLLING_STATES})
"""States whose next step is one message chain, numbered by the record's ``poll_gen``: a message of an
older generation does nothing, so a re-drive never leaves two chains alive."""


@dataclass(frozen=True)
class Transition:
    """The outcome of a compare-and-set: ``ok`` and the state found before it."""

    ok: bool
    previous: JobState | None
    reason: str  # 'ok', 'state' (not in an allowed state), 'stale' (poll generation moved), 'missing',
    # 'parent' (its workflow ended), and with a budget plan: 'budget' (a cap would be passed), 'quota'
    # (the producer's in-flight quota is full), 'unsettled' (only unanswered POSTs fill the cap)
    detail: str = ""
    """The budget or quota that refused the move."""
    until: float | None = None
    """When the refusing budget's window ends (Unix time), for 'budget'."""


def to_field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def queue_note(turn_in: float) -> str:
    """The record's note for a submit waiting in the admission queue."""
    return f"waiting for its turn at the rate limit (about {turn_in:.0f}s)"


class Ledger:
    """Job records in Redis. Plain Python: no Celery here."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        job_ttl: int = 7 * 86400,
        grace: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self.redis = client
        self.job_ttl = job_ttl
        self.grace = grace
        self.clock: Clock = clock or RedisClock(client)
        self._transition = client.register_script(_TRANSITION)
        self._trim = client.register_script(_TRIM)
        self._create = client.register_script(_CREATE)
        self._record_output = client.register_script(_RECORD_OUTPUT)
        self._claim = client.register_script(CLAIM_DUE)

    def create(
        self,
        job_id: str,
        kind: JobKind,
        request: Mapping[str, Any],
        *,
        expected_outputs: int,
        idempotency_key: str | None = None,
        model_id: str | None = None,
        parent_id: str | None = None,
        callback: Mapping[str, Any] | None = None,
        routing: Mapping[str, Any] | None = None,
        turn_in: float | None = None,
    ) -> Created:
        """Record a new job: ``pending``, or ``parked`` when ``model_id`` names a model still training.
        With an idempotency key seen before, nothing is written and the earlier job's id comes back.
        ``turn_in``: the job is to wait in the admission queue, its turn about that many seconds away
        (no submit message is sent; see :class:`genq.intake.TurnQueue`)."""
        now = self.clock()
        fields = {
            "id": job_id,
            "kind": kind.value,
            "request": dict(request),
            "created_at": now,
            "updated_at": now,
            "expected_outputs": expected_outputs,
            "poll_gen": 0,
            "model_id": model_id,
            "parent_id": parent_id,
            "callback": dict(callback) if callback else None,
            "callback_id": uuid.uuid4().hex if callback else None,
            **(routing or {}),  # producer, lane, on_budget
        }
        if turn_in is not None:
            fields["error"] = queue_note(turn_in)
        idem_key = keys.idempotency(idempotency_key) if idempotency_key else ""
        model_keys = [keys.model(model_id), keys.model_parked(model_id)] if model_id else ["", ""]
        # Due when the submit message should long have run: the sweeper sends it again if not. A job
        # waiting for its turn is held for twice the queue's length: should the turn never come (the
        # queue lost in a failover), the sweeper sends it then, and it queues again.
        due = now + self.grace + (2 * turn_in if turn_in is not None else 0.0)
        args: list[Any] = [job_id, kind.value, now, due, keys.EVENTS_MAXLEN, self.job_ttl, parent_id or ""]
        for name, value in fields.items():
            args += [name, to_field(value)]
        created, found, state = self._create(
            keys=[keys.job(job_id), keys.EVENTS, keys.JOBS, keys.DUE, keys.COUNTS, idem_key, *model_keys],
            args=args,
        )
        return Created(as_text(found), bool(created), JobState(as_text(state)) if created else None)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(keys.job(job_id))
        if not raw:
            return None
        return JobRecord.from_hash({as_text(k): as_text(v) for k, v in raw.items()})

    def transition(
        self,
        job_id: str,
        allowed: Iterable[JobState],
        to: JobState,
        *,
        expect_gen: int | None = None,
        due_at: float | object | None = KEEP,
        held: bool = False,
        parent_live: bool = False,
        budget: str = "",
        refund: bool = False,
        **fields: Any,
    ) -> Transition:
        """Move ``job_id`` to ``to`` if it is in one of ``allowed`` (and, with ``expect_gen``, its poll
        generation still matches), setting ``fields``.

        ``due_at`` is when the job's next step is expected: the sweeper re-drives it ``grace`` seconds
        after that if no message did. With ``held`` no message is sent at all (a long wait kept in Redis
        only) and the sweeper dispatches it right at ``due_at``. ``None`` drops the job from the due
        index; :data:`KEEP` leaves it. Terminal states drop it and start the record's TTL.

        With ``parent_live`` the move is refused (reason ``'parent'``) when the job's workflow has
        ended, checked in the same atomic step. ``budget`` (a :meth:`genq.budgets.Plan.to_json`)
        checks and charges the spend budgets and the in-flight quota in that step too. ``refund``: a
        job leaving ``submitting`` gets its charge back (the upstream surely did not act on it)."""
        if to.terminal:
            due_at = None
            fields.setdefault("finished_at", self.clock())
        if due_at is KEEP:
            due = ""
        elif due_at is None:
            due = "-"
        else:
            due = repr(float(due_at) + (0.0 if held else self.grace))  # type: ignore[arg-type]
        args: list[Any] = [
            job_id,
            ",".join(s.value for s in allowed),
            to.value,
            self.clock(),
            "" if expect_gen is None else str(expect_gen),
            due,
            self.job_ttl if to.terminal else "",
            self.clock() + self.grace,
            "1" if parent_live else "",
            budget,
            "refund" if refund else "",
        ]
        for name, value in fields.items():
            args += [name, to_field(value)]
        ok, prev, reason, *extra = self._transition(
            keys=[keys.job(job_id), keys.EVENTS, keys.DUE, keys.COUNTS, keys.CALLBACKS_DUE, keys.EXPIRING],
            args=args,
        )
        prev_text = as_text(prev)
        detail, until = (as_text(extra[0]), float(as_text(extra[1])) or None) if extra else ("", None)
        return Transition(
            bool(ok), JobState(prev_text) if prev_text else None, as_text(reason), detail, until
        )

    def batch_lane(self, job_ids: list[str]) -> set[str]:
        """Those of ``job_ids`` in the batch lane (one round trip)."""
        if not job_ids:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "lane")
        return {j for j, lane in zip(job_ids, pipe.execute(), strict=True) if as_text(lane) == "batch"}

    def record_output(self, job_id: str, output: OutputFile) -> int:
        """Store one downloaded output; returns how many are still missing (-1: job not downloading)."""
        remaining = self._record_output(
            keys=[keys.job(job_id)],
            args=[f"out:{output.index:04d}", output.model_dump_json(), self.clock()],
        )
        return int(remaining)

    def count_try(self, job_id: str, field: str) -> int:
        """Add one to a counter on the job's record (tries of one output); returns the new count."""
        return int(self.redis.hincrby(keys.job(job_id), field, 1))

    def set_fields(self, job_id: str, **fields: Any) -> None:
        """Write fields without a state change; only for facts that must not be lost (an upstream id)."""
        self.redis.hset(keys.job(job_id), mapping={k: to_field(v) for k, v in fields.items()})

    def set_urls(self, job_id: str, urls: Mapping[int, str]) -> None:
        """The outputs' URLs, apart from the record (its every read would carry them); the step that
        ends the job deletes them."""
        if urls:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(keys.job_urls(job_id), mapping={str(i): u for i, u in urls.items()})
            pipe.expire(keys.job_urls(job_id), self.job_ttl)
            pipe.execute()

    def get_url(self, job_id: str, index: int) -> str | None:
        value = self.redis.hget(keys.job_urls(job_id), str(index))
        return None if value is None else as_text(value)

    def counts(self) -> dict[str, int]:
        """``<kind>:<state>`` -> number of jobs, for every pair that ever had one."""
        return state_counts(self.redis.hgetall(keys.COUNTS))

    def list_ids(self, limit: int = 100, offset: int = 0) -> list[str]:
        """Job ids, newest first."""
        return [as_text(i) for i in self.redis.zrevrange(keys.JOBS, offset, offset + limit - 1)]

    def list_records(
        self, *, states: set[JobState] | None = None, kinds: set[JobKind] | None = None, limit: int = 50
    ) -> list[JobRecord]:
        """Newest first, filtered; scans at most ``SCAN_CAP`` recent jobs."""
        found: list[JobRecord] = []
        for offset in range(0, SCAN_CAP, 500):
            ids = self.list_ids(500, offset)
            if not ids:
                break
            pipe = self.redis.pipeline()
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            for raw in pipe.execute():
                if not raw:
                    continue  # expired
                record = JobRecord.from_hash({as_text(k): as_text(v) for k, v in raw.items()})
                if (states is None or record.state in states) and (kinds is None or record.kind in kinds):
                    found.append(record)
                    if len(found) >= limit:
                        return found
        return found

    def read_events(self, after: str, block_ms: int, count: int = 500) -> list[JobEvent]:
        """Transitions after stream id ``after`` (``"$"``: only new ones), waiting up to ``block_ms``."""
        answer: Any = self.redis.xread({keys.EVENTS: after}, block=block_ms, count=count)
        events = []
        for _stream, entries in answer or []:
            for entry_id, data in entries:
                fields = {as_text(k): as_text(v) for k, v in data.items()}
                events.append(JobEvent.from_stream(as_text(entry_id), fields))
        return events

    def last_event_id(self) -> str:
        last = self.redis.xrevrange(keys.EVENTS, count=1)
        return as_text(last[0][0]) if last else "0-0"

    def callback_attempted(
        self, job_id: str, *, state: str, attempts: int, error: str | None, retry_at: float | None
    ) -> None:
        """Record a delivery attempt: ``state`` pending (with ``retry_at``), delivered or failed."""
        pipe = self.redis.pipeline()
        pipe.hset(
            keys.job(job_id),
            mapping={
                "callback_state": state,
                "callback_attempts": attempts,
                "callback_error": to_field(error),
            },
        )
        if retry_at is None:
            pipe.zrem(keys.CALLBACKS_DUE, job_id)
        else:
            pipe.zadd(keys.CALLBACKS_DUE, {job_id: retry_at})
        if state in ("delivered", "failed"):
            # Settled: the ended record's TTL starts now (it was kept while its callback was due).
            pipe.expire(keys.job(job_id), self.job_ttl)
            pipe.zadd(keys.EXPIRING, {job_id: self.clock() + self.job_ttl})
        pipe.execute()

    def drop_callback_due(self, job_id: str) -> None:
        """No callback is due for the job (any more)."""
        self.redis.zrem(keys.CALLBACKS_DUE, job_id)

    def claim_callbacks(self, limit: int = 500) -> list[str]:
        """Jobs whose callback delivery is due (or whose delivery message was lost)."""
        flat = self._claim(
            keys=[keys.CALLBACKS_DUE], args=[self.clock(), limit, self.grace, keys.JOB_PREFIX, ""]
        )
        return [as_text(flat[i]) for i in range(0, len(flat), CLAIM_FIELDS)]

    def begin_sweep(self, min_gap: float) -> bool:
        """True for the one sweep that may run now: none began in the last ``min_gap`` seconds."""
        return bool(self.redis.set(keys.SWEEP_LOCK, "1", nx=True, px=max(1, int(min_gap * 1000))))

    def mark_swept(self) -> None:
        self.redis.set(keys.SWEEP_LAST, repr(self.clock()))

    def last_swept(self) -> float | None:
        value = self.redis.get(keys.SWEEP_LAST)
        return None if value is None else float(as_text(value))

    def claim_due(
        self,
        limit: int = 500,
        queued: QueuedSince = NOTHING_QUEUED,
        ahead: float = 0.0,
        polls_queued: QueuedSince = NOTHING_QUEUED,
    ) -> list[Claimed]:
        """Jobs whose next step is due (or overdue: no message came); each is pushed forward, and a
        job waiting to be submitted or polled gets a new step generation (its old chain goes stale).
        A pending job whose submit was sent since ``queued`` (the oldest submit still waiting in its
        lane's queue), or a polled job whose poll was sent since ``polls_queued``, is only pushed
        forward: its message is still in the queue.

        ``ahead`` (seconds) claims a job waiting to be submitted or polled (a chained state, not a
        workflow) up to that long before it is due, so its message can be sent now with a countdown
        to :attr:`Claimed.due`; other jobs are claimed only once due. It is kept below half the grace:
        a claim pushes the entry at least a grace past its due time, out of the look-ahead."""
        ahead = max(0.0, min(ahead, self.grace / 2))
        flat = self._claim(
            keys=[keys.DUE],
            args=[
                self.clock(),
                limit,
                self.grace,
                keys.JOB_PREFIX,
                ",".join(s.value for s in CHAINED_STATES),
                "" if queued.interactive is None else repr(queued.interactive),
                "" if queued.batch is None else repr(queued.batch),
                repr(ahead),
                "" if polls_queued.interactive is None else repr(polls_queued.interactive),
                "" if polls_queued.batch is None else repr(polls_queued.batch),
            ],
        )
        return [
            Claimed(
                as_text(flat[i]),
                JobState(as_text(flat[i + 1])),
                int(flat[i + 2]),
                as_text(flat[i + 3]),
                as_text(flat[i + 4]) == "batch",
                float(as_text(flat[i + 5])),
            )
            for i in range(0, len(flat), CLAIM_FIELDS)
        ]

    def trim(self, limit: int = 1000) -> int:
        """Drop the ids of expired records from every index; returns how many went."""
        return int(
            self._trim(
                keys=[keys.EXPIRING, keys.JOBS, keys.DUE, keys.CALLBACKS_DUE],
                args=[self.clock(), limit, keys.JOB_PREFIX],
            )
        )

    def make_durable(self, replicas: int, timeout: float) -> bool:
        """Whether at least ``replicas`` replicas have every write made so far (by any connection, this
        ledger's or not), waiting up to ``timeout`` seconds for them; True at once when ``replicas`` is 0.

        WAIT only counts acknowledgements of what its own connection last did (its last write on Redis
        7.2+, its last command on 7.0), and a pooled connection may not be the one that wrote. So a
        small marker write and the WAIT go in one pipeline, on one connection: the replication stream
        is ordered, so a replica that has the marker has everything written before it."""
        if replicas <= 0:
            return True
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.DURABLE_MARK, repr(self.clock()))
        pipe.wait(replicas, max(1, int(timeout * 1000)))
        _, acknowledged = pipe.execute()
        return int(acknowledged) >= replicas


def as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)
