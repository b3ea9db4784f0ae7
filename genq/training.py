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

from genq import retry
from genq.actions import Action, PollModelLater, TrainLater
from genq.api import UpstreamClient
from genq.errors import GenqError, ProtocolError, UpstreamUnavailable
from genq.jobs import JobService
from genq.model_ledger import ModelLedger
from genq.polling import clamp_to_deadline, poll_delay
from genq.schemas import ModelRecord, ModelState
from genq.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class TrainingService:
    settings: Settings
    models: ModelLedger
    api: UpstreamClient
    jobs: JobService
    clock: Callable[[], float]
    rng: random.Random

    def request(self, model_id: str, force: bool = False) -> int:
        """Record a train request; returns the step generation of the train task this caller must
        send, or 0 when another caller's request is already under way."""
        return self.models.request(model_id, deadline=self.settings.poll.model.deadline, force=force)

    def train(self, model_id: str, gen: int = 0) -> list[Action]:
        """Make the train call, at most once per request: the call is claimed in the ledger first, and
        a call whose answer was lost (timeout, a worker dying) is never repeated; readiness checks
        then tell whether it started."""
        rec = self.models.get(model_id)
        if rec is None or rec.state is not ModelState.REQUESTED or rec.poll_gen != gen:
            return []  # a duplicate or stale delivery, or training already under way
        now = self.clock()
        if rec.deadline_at is not None and now >= rec.deadline_at:
            # Held back (throttled, 429s) until it could no longer be ready in time: not worth paying.
            limit = self.settings.poll.model.deadline
            reason = f"not trained within {limit:.0f}s: the train call was held back that long"
            return self._finish(rec, ModelState.TIMED_OUT, [ModelState.REQUESTED], reason)
        if rec.call_started_at is not None:
            reason = "train call began but its answer was never recorded; checking"
            return self._check_from(rec, reason, calls=1)
        claimed, _ = self.models.transition(
            model_id,
            [ModelState.REQUESTED],
            ModelState.REQUESTED,
            expect_gen=gen,
            detail="train call",
            poll_gen=gen + 1,
            call_started_at=now,
            due_at=now + self.settings.api.connect_timeout + self.settings.api.read_timeout + 5.0,
        )
        if not claimed.ok:
            return []
        rec = rec.model_copy(update={"poll_gen": gen + 1, "call_started_at": now})
        try:
            answer = self.api.train_model(model_id)
        except UpstreamUnavailable as exc:
            if exc.ambiguous:
                return self._check_from(rec, f"train call outcome unknown ({exc}); checking", calls=1)
            return self._train_later(rec, exc)
        except ProtocolError as exc:
            return self._check_from(rec, f"train call answered oddly ({exc}); checking", calls=1)
        except GenqError as exc:
            return self._train_later(rec, exc)
        log.info("model %s: training started", model_id)
        return self._check_from(rec, f"train call accepted: {answer[:80]}", calls=1)

    def _check_from(self, rec: ModelRecord, detail: str, calls: int = 0) -> list[Action]:
        """The train call was made (or may have been): from now on, check readiness."""
        now = self.clock()
        policy = self.settings.poll.model
        delay = clamp_to_deadline(
            poll_delay(policy, 0, self.rng), now, rec.deadline_at or now + policy.deadline
        )
        return self._schedule(
            rec,
            ModelState.REQUESTED,
            delay,
            detail=detail,
            started_at=now,
            train_calls=rec.train_calls + calls,
            errors_in_row=0,
            error=None,
        )

    def _train_later(self, rec: ModelRecord, exc: GenqError) -> list[Action]:
        """Nothing reached the upstream: release the claim and call again later (a new generation),
        or give up."""
        verdict = self._after(exc, rec, cap=300.0)
        if isinstance(verdict, retry.GiveUp):
            reason = f"train call {verdict.reason}"
            return self._finish(rec, ModelState.FAILED, [ModelState.REQUESTED], reason)
        gen = rec.poll_gen + 1
        held = self.settings.poll.held(verdict.delay)
        moved, _ = self.models.transition(
            rec.id,
            [ModelState.REQUESTED],
            ModelState.REQUESTED,
            expect_gen=rec.poll_gen,
            detail=str(exc),
            poll_gen=gen,
            call_started_at=None,
            errors_in_row=verdict.errors,
            error=str(exc),
            due_at=self.clock() + verdict.delay,
            held=held,
        )
        return [TrainLater(rec.id, verdict.delay, gen)] if moved.ok and not held else []

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
        except GenqError as exc:
            return self._poll_error(rec, exc)
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

    def _poll_error(self, rec: ModelRecord, exc: GenqError) -> list[Action]:
        verdict = self._after(exc, rec, cap=self.settings.poll.model.max_interval)
        if isinstance(verdict, retry.GiveUp):
            reason = f"readiness check {verdict.reason}"
            return self._finish(rec, ModelState.FAILED, [ModelState.TRAINING], reason)
        now = self.clock()
        delay = clamp_to_deadline(verdict.delay, now, rec.deadline_at or now + verdict.delay)
        if not verdict.counted:
            return self._schedule(rec, ModelState.TRAINING, delay, detail="check throttled")
        return self._schedule(
            rec,
            ModelState.TRAINING,
            delay,
            detail=f"check error: {exc}",
            errors_in_row=verdict.errors,
            error=str(exc),
        )

    def _after(self, exc: GenqError, rec: ModelRecord, cap: float) -> retry.Again | retry.GiveUp:
        poll = self.settings.poll
        return retry.after(
            exc, rec.errors_in_row, limit=poll.max_errors, backoff=poll.error_backoff, cap=cap, rng=self.rng
        )

    def _schedule(
        self, rec: ModelRecord, current: ModelState, delay: float, detail: str, **fields: Any
    ) -> list[Action]:
        """Record the next readiness check under a new poll generation. A check minutes away (the
        default) is held in Redis and dispatched by the sweeper, not a countdown held by a worker."""
        gen = rec.poll_gen + 1
        held = self.settings.poll.held(delay)
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
