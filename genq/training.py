"""Model training readiness, as plain Python: start training once, poll every few minutes, release or
fail the generations parked on the model. No Celery here.

``GET /models/{id}/train`` answers a success string and no job id; readiness is ``GET /models/{id}``
reporting ``ready``. Training takes 20-25 minutes upstream, so the model poll policy checks about
every 5 minutes, each check a countdown re-enqueue that holds no worker slot.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.settings import Settings
from genq.actions import Action, PollModelLater, TrainLater
from genq.api import UpstreamClient
from genq.errors import PermanentError, ProtocolError, Throttled, TransientError
from genq.jobs import JobService
from genq.model_store import ModelLedger
from genq.models import ModelRecord, ModelState
from genq.polling import clamp_to_deadline, error_delay, poll_delay

log = logging.getLogger(__name__)


@dataclass
class TrainingService:
    settings: Settings
    models: ModelLedger
    api: UpstreamClient
    jobs: JobService
    clock: Callable[[], float]
    rng: random.Random

    def request(self, model_id: str, force: bool = False) -> bool:
        """Record a train request; True when this caller must send the train task."""
        deadline_at = self.clock() + self.settings.poll.model.deadline
        return self.models.request(model_id, deadline_at=deadline_at, force=force)

    def train(self, model_id: str) -> list[Action]:
        rec = self.models.get(model_id)
        if rec is None or rec.state is not ModelState.REQUESTED:
            return []  # a duplicate delivery, or training already under way
        try:
            answer = self.api.train_model(model_id)
        except Throttled as exc:
            return [TrainLater(model_id, exc.retry_after or 0.1)]
        except (TransientError, ProtocolError) as exc:
            return self._train_error(rec, exc)
        except PermanentError as exc:
            return self._finish(rec, ModelState.FAILED, [ModelState.REQUESTED], f"train call refused: {exc}")
        now = self.clock()
        policy = self.settings.poll.model
        delay = clamp_to_deadline(
            poll_delay(policy, 0, self.rng), now, rec.deadline_at or now + policy.deadline
        )
        log.info("model %s: training started; first check in %.0fs", model_id, delay)
        return self._schedule(
            rec,
            ModelState.REQUESTED,
            delay,
            detail=f"train call accepted: {answer[:80]}",
            started_at=now,
            train_calls=rec.train_calls + 1,
            errors_in_row=0,
            error=None,
        )

    def poll(self, model_id: str, gen: int) -> list[Action]:
        rec = self.models.get(model_id)
        if rec is None or rec.state is not ModelState.TRAINING or rec.poll_gen != gen:
            return []
        now = self.clock()
        if rec.deadline_at is not None and now >= rec.deadline_at:
            limit = self.settings.poll.model.deadline
            return self._finish(
                rec, ModelState.TIMED_OUT, [ModelState.TRAINING], f"not ready within {limit:.0f}s"
            )
        try:
            upstream = self.api.get_model(model_id)
        except Throttled as exc:
            return [PollModelLater(model_id, gen, exc.retry_after or 0.1)]
        except (TransientError, ProtocolError) as exc:
            return self._poll_error(rec, exc)
        except PermanentError as exc:
            return self._finish(rec, ModelState.FAILED, [ModelState.TRAINING], f"readiness check: {exc}")
        checks = rec.checks + 1
        if upstream.ready:
            return self._finish(
                rec, ModelState.READY, [ModelState.TRAINING], None, ready_at=now, checks=checks
            )
        if upstream.failed:
            reason = f"training failed upstream: {upstream.error or upstream.status}"
            return self._finish(rec, ModelState.FAILED, [ModelState.TRAINING], reason, checks=checks)
        delay = poll_delay(self.settings.poll.model, checks, self.rng)
        delay = clamp_to_deadline(delay, now, rec.deadline_at or now + delay)
        return self._schedule(
            rec,
            ModelState.TRAINING,
            delay,
            detail=f"check {checks}: {upstream.status}",
            checks=checks,
            errors_in_row=0,
            upstream_status=upstream.status,
        )

    def abandon(self, model_id: str, reason: str) -> list[Action]:
        """End training that cannot make progress; its parked jobs fail with the reason."""
        rec = self.models.get(model_id)
        if rec is None:
            return []
        return self._finish(rec, ModelState.FAILED, [ModelState.REQUESTED, ModelState.TRAINING], reason)

    def _train_error(self, rec: ModelRecord, exc: Exception) -> list[Action]:
        errors = rec.errors_in_row + 1
        if errors >= self.settings.poll.max_errors:
            reason = f"train call failed {errors} times: {exc}"
            return self._finish(rec, ModelState.FAILED, [ModelState.REQUESTED], reason)
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        delay = error_delay(self.settings.poll.error_backoff, errors, retry_after, 300.0, self.rng)
        self.models.transition(
            rec.id,
            [ModelState.REQUESTED],
            ModelState.REQUESTED,
            detail=str(exc),
            errors_in_row=errors,
            error=str(exc),
        )
        return [TrainLater(rec.id, delay)]

    def _poll_error(self, rec: ModelRecord, exc: Exception) -> list[Action]:
        errors = rec.errors_in_row + 1
        if errors >= self.settings.poll.max_errors:
            reason = f"readiness check failed {errors} times in a row: {exc}"
            return self._finish(rec, ModelState.FAILED, [ModelState.TRAINING], reason)
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        policy = self.settings.poll.model
        delay = error_delay(
            self.settings.poll.error_backoff, errors, retry_after, policy.max_interval, self.rng
        )
        return self._schedule(
            rec,
            ModelState.TRAINING,
            delay,
            detail=f"check error: {exc}",
            errors_in_row=errors,
            error=str(exc),
        )

    def _schedule(
        self, rec: ModelRecord, current: ModelState, delay: float, detail: str, **fields: Any
    ) -> list[Action]:
        """Record the next readiness check under a new poll generation. A check minutes away (the
        default) is held in Redis and dispatched by the sweeper, not a countdown held by a worker."""
        gen = rec.poll_gen + 1
        held = delay > self.settings.poll.countdown_max
        moved, _ = self.models.transition(
            rec.id,
            [current],
            ModelState.TRAINING,
            expect_gen=rec.poll_gen,
            detail=detail,
            due_at=self.clock() + delay,
            held=held,
            poll_gen=gen,
            **fields,
        )
        return [PollModelLater(rec.id, gen, delay)] if moved.ok and not held else []

    def _finish(
        self,
        rec: ModelRecord,
        to: ModelState,
        allowed: list[ModelState],
        reason: str | None,
        **fields: Any,
    ) -> list[Action]:
        """End training and, in the same atomic step, take every parked job off the model."""
        moved, parked = self.models.transition(
            rec.id, allowed, to, release=True, detail=reason or "ready", error=reason, **fields
        )
        if not moved.ok:
            return []
        log.info("model %s %s (%s); %d parked jobs", rec.id, to.value, reason or "ok", len(parked))
        actions: list[Action] = []
        for job_id in parked:
            if to is ModelState.READY:
                actions += self.jobs.release(job_id)
            else:
                actions += self.jobs.fail_parked(job_id, f"model {rec.id} {to.value}: {reason}")
        return actions
