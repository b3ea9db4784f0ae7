"""The sweeper: one periodic pass over the due indexes, for jobs and for models.

Two things look the same from here: a long wait held in Redis whose time has come (dispatch it), and
a job whose message never came, because a worker died holding it or it was lost (re-drive it). Both
are "due", differing only by the grace period the ledger added when it recorded the wait. Re-driving
is always safe: every step checks the ledger first, and a polled job gets a new poll generation in
the same atomic claim, so at most one poll chain per job stays live.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from genq.actions import (
    Action,
    Download,
    Finalize,
    Notify,
    PollLater,
    PollModelLater,
    SubmitLater,
    TrainLater,
)
from genq.jobs import JobService
from genq.model_store import ModelLedger
from genq.models import POLLING_STATES, JobKind, JobState, ModelState
from genq.store import Ledger

log = logging.getLogger(__name__)


@dataclass
class Sweeper:
    ledger: Ledger
    models: ModelLedger
    jobs: JobService
    clock: Callable[[], float]

    def sweep(self, batch: int = 500, max_batches: int = 20) -> tuple[list[Action], Counter[str]]:
        """Claim what is due and return the actions that drive it on, with counts by state."""
        actions: list[Action] = []
        seen: Counter[str] = Counter()
        for _ in range(max_batches):
            claimed = self.ledger.claim_due(batch)
            for job_id, state, gen in claimed:
                seen[state.value] += 1
                actions += self._drive_job(job_id, state, gen)
            if len(claimed) < batch:
                break
        for model_id, model_state, gen in self.models.claim_due(batch):
            seen[f"model:{model_state.value}"] += 1
            if model_state is ModelState.REQUESTED:
                actions.append(TrainLater(model_id, 0.0))
            elif model_state is ModelState.TRAINING:
                actions.append(PollModelLater(model_id, gen, 0.0))
        for job_id in self.ledger.claim_callbacks(batch):
            seen["callback"] += 1
            actions.append(Notify(job_id))
        self.ledger.mark_swept()
        if seen:
            log.info("sweep: %s", dict(seen))
        return actions, seen

    def _drive_job(self, job_id: str, state: JobState, gen: int) -> list[Action]:
        if state in (JobState.PENDING, JobState.SUBMITTING):
            # A submit finding the job still submitting long after its POST began marks it
            # submit_unknown rather than paying twice.
            return [SubmitLater(job_id, 0.0)]
        if state in POLLING_STATES:
            return [PollLater(job_id, gen, 0.0)]
        rec = self.ledger.get(job_id)
        if rec is None:
            return []
        if state is JobState.DOWNLOADING:
            have = {out.index for out in rec.outputs}
            missing = [i for i in range(rec.expected_outputs) if i not in have]
            return [Download(job_id, i) for i in missing] or [Finalize(job_id)]
        if state is JobState.PARKED and rec.model_id:
            model = self.models.get(rec.model_id, history=0)
            if model is None or model.state is ModelState.READY:
                return self.jobs.release(job_id)
            if not model.state.in_progress:
                return self.jobs.fail_parked(
                    job_id, f"model {rec.model_id} {model.state.value}: {model.error}"
                )
            return []
        if rec.kind is JobKind.WORKFLOW and state is JobState.RUNNING:
            return self.jobs.workflows.resume(rec)
        return []
