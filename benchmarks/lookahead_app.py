"""A PROTOTYPE for the lead, not genqueue's code: the sweeper with a look-ahead.

``celery -A benchmarks.lookahead_app worker|beat`` is genqueue's app with ``Ledger.claim_due`` and
``Sweeper._drive_job`` patched so that one sweep claims every entry of ``genq:due`` due before the *next*
sweep (``now + GENQ_WORKER_SWEEP_INTERVAL``) and sends each polled job's poll as a countdown of exactly
``due - now`` (0 when overdue). A held wait then starts on time instead of up to one sweep interval
late, while a worker still holds at most one sweep interval's worth of countdowns (due rate x interval,
independent of how many jobs are in flight). Everything else (claim semantics, the new poll generation,
pushing the claimed entry forward by the grace) is the same Lua as ``genq.ledger.CLAIM_DUE``.

The change proposed for genq: ``CLAIM_DUE`` takes a horizon and returns each entry's score;
``Ledger.claim_due(limit, horizon)`` passes ``now + sweep_interval``; ``Sweeper._drive_job`` makes
``PollLater(job_id, gen, max(0, due - now))`` (and ``SubmitLater`` likewise) instead of a 0 countdown.
"""

from __future__ import annotations

from typing import Any

from genq.actions import Action, PollLater
from genq.ledger import Ledger, as_text
from genq.schemas import POLLING_STATES, JobState
from genq.sweeper import Sweeper
from genq.worker.celery_app import app

__all__ = ["app"]

CLAIM_AHEAD = """
local now = tonumber(ARGV[1])
local horizon = tonumber(ARGV[6])
local polling = {}
for s in string.gmatch(ARGV[5], '[^,]+') do polling[s] = true end
local out = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #due, 2 do
  local id = due[i]
  local key = ARGV[4] .. id
  local state = redis.call('HGET', key, 'state')
  if not state then
    redis.call('ZREM', KEYS[1], id)
  else
    local gen = tonumber(redis.call('HGET', key, 'poll_gen') or '0')
    if polling[state] then gen = redis.call('HINCRBY', key, 'poll_gen', 1) end
    redis.call('ZADD', KEYS[1], math.max(now, tonumber(due[i + 1])) + tonumber(ARGV[3]), id)
    table.insert(out, id)
    table.insert(out, state)
    table.insert(out, tostring(gen))
    table.insert(out, due[i + 1])
  end
end
return out
"""

_due_at: dict[str, float] = {}


def _claim_due(self: Ledger, limit: int = 500) -> list[tuple[str, JobState, int]]:
    from genq.settings import get_settings

    script = getattr(self, "_claim_ahead", None)
    if script is None:
        script = self._claim_ahead = self.redis.register_script(CLAIM_AHEAD)  # type: ignore[attr-defined]
    now = self.clock()
    horizon = now + get_settings().worker.sweep_interval
    flat = script(
        keys=["genq:due"],
        args=[now, limit, self.grace, "genq:job:", ",".join(s.value for s in POLLING_STATES), horizon],
    )
    out = []
    for i in range(0, len(flat), 4):
        job_id = as_text(flat[i])
        _due_at[job_id] = float(as_text(flat[i + 3]))
        out.append((job_id, JobState(as_text(flat[i + 1])), int(flat[i + 2])))
    return out


_original_drive = Sweeper._drive_job


def _drive_job(self: Sweeper, job_id: str, state: JobState, gen: int) -> list[Action]:
    due = _due_at.pop(job_id, None)
    actions: list[Any] = _original_drive(self, job_id, state, gen)
    if due is None:
        return actions
    wait = max(0.0, due - self.clock())
    return [PollLater(a.job_id, a.gen, wait) if isinstance(a, PollLater) else a for a in actions]


Ledger.claim_due = _claim_due  # type: ignore[method-assign]
Sweeper._drive_job = _drive_job  # type: ignore[method-assign]
