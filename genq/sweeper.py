"""The sweeper: one periodic pass over the due indexes, for jobs and for models.

Two things look the same from here: a long wait held in Redis whose time has come (dispatch it), and
a job whose message never came, because a worker died holding it or it was lost (re-drive it). Both
are "due", differing only by the grace period the ledger added when it recorded the wait. Re-driving
is always safe: every step checks the ledger first, and a polled job gets a new poll generation in
the same atomic claim, so at most one poll chain per job stays live.

A held wait would be late by up to one sweep interval if it were sent only by the first sweep after
its time: the sweeper looks ahead instead (``ahead``: two sweep intervals as the services set it, so
a sweep that starts late, behind the poll queue it shares, still sends in time). A job waiting to be
submitted or polled (a model to be trained or checked) that falls due within the look-ahead is
claimed now and its message sent with a countdown to its due time, so a worker's ETA runs it on time.
Such countdowns are never longer than the look-ahead: workers still hold no long waits. The claim's
new generation makes any other message of the job stale, early or not.

Every delay a sweep returns counts from one clock reading, taken as it starts. A sweep of 1,000 jobs
takes about a second to send (a Celery message costs a millisecond or more), so its caller takes off
each delay the time gone by when it sends (``genq.worker.tasks.dispatch``); a countdown measured at
the claim would run each message late by the sending before it.
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
    """How far behind the submit queue is (:class:`genq.backlog.QueueBacklog`); by default unknown."""
    poll_backlog: Callable[[], QueuedSince] = QueuedSince
    """How far behind the poll queue is, likewise."""
    ahead: float = 0.0
    """Seconds of look-ahead: a job to submit or poll (a model to train or check) due within it is
    claimed now and sent with a countdown to its due time (see :meth:`genq.ledger.Ledger.claim_due`);
    0 sends only what is due."""

    def sweep(
        self, batch: int = 500, max_batches: int = 20, min_gap: float = 0.0
    ) -> tuple[list[Action], Counter[str]]:
        """Claim what is due and return the actions that drive it on, with counts by state. Does
        nothing when another sweep began less than ``min_gap`` seconds ago. Delays count from the
        sweep's start (see the module's docstring)."""
        actions: list[Action] = []
        seen: Counter[str] = Counter()
        if min_gap > 0 and not self.ledger.begin_sweep(min_gap):
            return actions, seen
        now = self.clock()
        queued, polls_queued = self.backlog(), self.poll_backlog()
        early = 0
        for _ in range(max_batches):
            claimed = self.ledger.claim_due(batch, queued, self.ahead, polls_queued)
            for job in claimed:
                seen[job.state.value] += 1
                early += job.due > now
                actions += self._drive_job(job, now)
            if len(claimed) < batch:
                break
        for model_id, model_state, gen, due in self.models.claim_due(batch, self.ahead):
            seen[f"model:{model_state.value}"] += 1
            early += due > now
            if model_state is ModelState.REQUESTED:
                actions.append(TrainLater(model_id, max(0.0, due - now), gen))
            elif model_state is ModelState.TRAINING:
                actions.append(PollModelLater(model_id, gen, max(0.0, due - now)))
        for job_id in self.ledger.claim_callbacks(batch):
            seen["callback"] += 1
            actions.append(Notify(job_id))
        actions += self.jobs.rearm_admission()
        trimmed = self.ledger.trim(batch)
        if trimmed:
            seen["expired"] += trimmed
        self.ledger.mark_swept()
        if seen:
            ahead = f" ({early} before they are due, as countdowns to it)" if early else ""
            log.info("sweep: %s%s", dict(seen), ahead)
        return actions, seen

    def _drive_job(self, job: Claimed, now: float) -> list[Action]:
        if job.kind == JobKind.WORKFLOW.value:
            # Checked before the states: a running workflow is not a polled job.
            rec = self.ledger.get(job.id)
            return self.jobs.workflows.resume(rec) if rec is not None else []
        # Claimed ahead of its time (a held wait due within the look-ahead): a countdown to it.
        wait = max(0.0, job.due - now)
        if job.state is JobState.PENDING:
            return [SubmitLater(job.id, wait, job.gen, job.batch)]
        if job.state is JobState.SUBMITTING:
            # Due only once its submit window has passed: the POST's worker died. It ends
            # submit_unknown rather than paying twice (or goes back to pending, if at-least-once).
            return self.jobs.settle_stalled_submit(job.id)
        if job.state in POLLING_STATES:
            return [PollLater(job.id, job.gen, wait, job.batch)]
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
