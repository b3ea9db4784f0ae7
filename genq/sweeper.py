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
from genq.ledger import Claimed, Ledger, QueuedSince
from genq.model_ledger import ModelLedger
from genq.schemas import POLLING_STATES, JobKind, JobState, ModelState

log = logging.getLogger(__name__)


@dataclass
class Sweeper:
    ledger: Ledger
    models: ModelLedger
    jobs: JobService
    clock: Callable[[], float]
    backlog: Callable[[], QueuedSince] = QueuedSince
    """How far behind the submit queue is (:class:`genq.backlog.SubmitBacklog`); by default unknown."""

    def sweep(
        self, batch: int = 500, max_batches: int = 20, min_gap: float = 0.0
    ) -> tuple[list[Action], Counter[str]]:
        """Claim what is due and return the actions that drive it on, with counts by state. Does
        nothing when another sweep began less than ``min_gap`` seconds ago."""
        actions: list[Action] = []
        seen: Counter[str] = Counter()
        if min_gap > 0 and not self.ledger.begin_sweep(min_gap):
            return actions, seen
        queued = self.backlog()
        for _ in range(max_batches):
            claimed = self.ledger.claim_due(batch, queued)
            for job in claimed:
                seen[job.state.value] += 1
                actions += self._drive_job(job)
            if len(claimed) < batch:
                break
        for model_id, model_state, gen in self.models.claim_due(batch):
            seen[f"model:{model_state.value}"] += 1
            if model_state is ModelState.REQUESTED:
                actions.append(TrainLater(model_id, 0.0, gen))
            elif model_state is ModelState.TRAINING:
                actions.append(PollModelLater(model_id, gen, 0.0))
        for job_id in self.ledger.claim_callbacks(batch):
            seen["callback"] += 1
            actions.append(Notify(job_id))
        actions += self.jobs.rearm_admission()
        trimmed = self.ledger.trim(batch)
        if trimmed:
            seen["expired"] += trimmed
        self.ledger.mark_swept()
        if seen:
            log.info("sweep: %s", dict(seen))
        return actions, seen

    def _drive_job(self, job: Claimed) -> list[Action]:
        if job.kind == JobKind.WORKFLOW.value:
            # Checked before the states: a running workflow is not a polled job.
            rec = self.ledger.get(job.id)
            return self.jobs.workflows.resume(rec) if rec is not None else []
        if job.state is JobState.PENDING:
            return [SubmitLater(job.id, 0.0, job.gen, job.batch)]
        if job.state is JobState.SUBMITTING:
            # Due only once its submit window has passed: the POST's worker died. It ends
            # submit_unknown rather than paying twice (or goes back to pending, if at-least-once).
            return self.jobs.settle_stalled_submit(job.id)
        if job.state in POLLING_STATES:
            return [PollLater(job.id, job.gen, 0.0, job.batch)]
        rec = self.ledger.get(job.id)
        if rec is None:
            return []
        if job.state is JobState.DOWNLOADING:
            have = {out.index for out in rec.outputs}
            missing = [i for i in range(rec.expected_outputs) if i not in have]
            return [Download(job.id, i, batch=job.batch) for i in missing] or [Finalize(job.id)]
        if job.state is JobState.PARKED and rec.model_id:
            model = self.models.get(rec.model_id, history=0)
            if model is None or model.state is ModelState.READY:
                return self.jobs.release(job.id)
            if not model.state.in_progress:
                return self.jobs.fail_parked(
                    job.id, f"model {rec.model_id} {model.state.value}: {model.error}"
                )
        return []
