"""Model training records in Redis, with their history and the jobs parked on them.

Like jobs, a model changes only by compare-and-set (one Lua script); every change appends to the
model's history list. Releasing parked jobs happens in the same script that marks the model ready or
failed, so a job can never be parked after the release that should have freed it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

from genq import keys
from genq.clock import Clock, RedisClock
from genq.ledger import CLAIM_DUE, CLAIM_FIELDS, Transition, as_text, to_field
from genq.schemas import ModelRecord, ModelState

_REQUEST = """
-- KEYS: model, history, models, due. ARGV: id, now, force ('1'/'0'), deadline (seconds), due
-- Returns {step generation of the train message to send (0: none), state found}.
local cur = redis.call('HGET', KEYS[1], 'state')
if cur == 'requested' or cur == 'training' then return {0, cur} end
if cur == 'ready' and ARGV[3] ~= '1' then return {0, cur} end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'state', 'requested', 'requested_at', ARGV[2],
           'updated_at', ARGV[2], 'deadline_at', tonumber(ARGV[2]) + tonumber(ARGV[4]), 'error', '',
           'errors_in_row', 0, 'checks', 0, 'ready_at', '', 'started_at', '', 'call_started_at', '')
local gen = redis.call('HINCRBY', KEYS[1], 'poll_gen', 1)
redis.call('ZADD', KEYS[3], 'NX', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
local entry = {at = tonumber(ARGV[2]), event = 'requested', from = cur or 'untrained'}
redis.call('RPUSH', KEYS[2], cjson.encode(entry))
return {gen, cur or 'untrained'}
"""

_TRANSITION = """
-- KEYS: model, history, parked, due. ARGV: from (comma list), to, now, expect_gen, release ('1'/'0'),
-- event detail, due ('' keep, '-' drop, else score), fields...
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, '', 'missing'} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then allowed = true end end
if not allowed then return {0, cur, 'state'} end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'poll_gen') ~= ARGV[4] then return {0, cur, 'stale'} end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_at', ARGV[3])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[7] == '-' then redis.call('ZREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
elseif ARGV[7] ~= '' then redis.call('ZADD', KEYS[4], ARGV[7], redis.call('HGET', KEYS[1], 'id')) end
redis.call('RPUSH', KEYS[2], cjson.encode({at = tonumber(ARGV[3]), event = ARGV[2], detail = ARGV[6]}))
local released = {}
if ARGV[5] == '1' then
  released = redis.call('SMEMBERS', KEYS[3])
  redis.call('DEL', KEYS[3])
end
return {1, cur, 'ok', released}
"""


class ModelLedger:
    """Model records. Plain Python: no Celery here."""

    def __init__(self, client: redis.Redis, *, grace: float = 30.0, clock: Clock | None = None) -> None:
        self.redis = client
        self.grace = grace
        self.clock: Clock = clock or RedisClock(client)
        self._request = client.register_script(_REQUEST)
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(CLAIM_DUE)

    def request(self, model_id: str, *, deadline: float, force: bool = False) -> int:
        """Mark training requested, to end within ``deadline`` seconds. Returns the step generation of
        the train message to send, or 0 when it is already requested, training, or ready (unless
        ``force``): only the caller that gets a generation sends it, so one upstream call per model."""
        now = self.clock()
        gen, _ = self._request(
            keys=[keys.model(model_id), keys.model_history(model_id), keys.MODELS, keys.MODELS_DUE],
            args=[model_id, now, "1" if force else "0", deadline, now + self.grace],
        )
        return int(gen)

    def transition(
        self,
        model_id: str,
        allowed: Iterable[ModelState],
        to: ModelState,
        *,
        expect_gen: int | None = None,
        release: bool = False,
        detail: str = "",
        due_at: float | None = None,
        held: bool = False,
        **fields: Any,
    ) -> tuple[Transition, list[str]]:
        """Compare-and-set the model's state; with ``release``, also empty its parked set atomically and
        return the job ids that were parked. ``due_at`` works as for jobs (see ``Ledger.transition``);
        a model that stops training leaves the due index."""
        if not to.in_progress:
            due = "-"
        elif due_at is None:
            due = ""
        else:
            due = repr(due_at + (0.0 if held else self.grace))
        args: list[Any] = [
            ",".join(s.value for s in allowed),
            to.value,
            self.clock(),
            "" if expect_gen is None else str(expect_gen),
            "1" if release else "0",
            detail,
            due,
        ]
        for name, value in fields.items():
            args += [name, to_field(value)]
        result = self._transition(
            keys=[
                keys.model(model_id),
                keys.model_history(model_id),
                keys.model_parked(model_id),
                keys.MODELS_DUE,
            ],
            args=args,
        )
        prev = as_text(result[1])
        released = [as_text(j) for j in result[3]] if len(result) > 3 else []
        return Transition(bool(result[0]), None, as_text(result[2]) or prev), released

    def note(self, model_id: str, event: str, **detail: Any) -> None:
        """Append to the model's history without a state change (a check that found it still training)."""
        entry = {"at": self.clock(), "event": event, **detail}
        self.redis.rpush(keys.model_history(model_id), json.dumps(entry))

    def get(self, model_id: str, history: int = 50) -> ModelRecord | None:
        pipe = self.redis.pipeline()
        pipe.hgetall(keys.model(model_id))
        pipe.lrange(keys.model_history(model_id), -history, -1)
        pipe.scard(keys.model_parked(model_id))
        raw, hist, parked = pipe.execute()
        if not raw:
            return None
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        return ModelRecord.from_hash(fields, [as_text(h) for h in hist], int(parked))

    def claim_due(self, limit: int = 100, ahead: float = 0.0) -> list[tuple[str, ModelState, int, float]]:
        """Models whose next step is due, as ``(id, state, poll_gen, due)`` (see ``Ledger.claim_due``):
        the claim starts a new step generation, so the train or check message it leads to is the only
        live one. With ``ahead`` (seconds, kept below half the grace), a model due within it is claimed
        already, its message to be sent with a countdown to ``due``."""
        flat = self._claim(
            keys=[keys.MODELS_DUE],
            args=[
                self.clock(),
                limit,
                self.grace,
                keys.MODEL_PREFIX,
                "requested,training",
                "",
                "",
                repr(max(0.0, min(ahead, self.grace / 2))),
            ],
        )
        return [
            (
                as_text(flat[i]),
                ModelState(as_text(flat[i + 1])),
                int(flat[i + 2]),
                float(as_text(flat[i + 5])),
            )
            for i in range(0, len(flat), CLAIM_FIELDS)
        ]

    def list_ids(self, limit: int = 100) -> list[str]:
        return [as_text(i) for i in self.redis.zrevrange(keys.MODELS, 0, limit - 1)]
