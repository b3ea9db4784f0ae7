"""Commands on jobs already accepted: cancel one, or deliberately submit again one whose submit outcome
is unknown. Shared by the producer, the command line and the dashboard."""

from __future__ import annotations

import uuid

from genq.ledger import Ledger
from genq.schemas import JobState


def cancel(ledger: Ledger, job_id: str) -> bool:
    """Cancel a job; a step cancels its whole workflow. Later deliveries for it do nothing (every task
    checks the state first). Returns False when it had already ended."""
    rec = ledger.get(job_id)
    if rec is None:
        return False
    if rec.parent_id:
        return cancel(ledger, rec.parent_id)
    live = [s for s in JobState if not s.terminal]
    moved = ledger.transition(job_id, live, JobState.CANCELLED, error="cancelled by request")
    for child in rec.children:
        ledger.transition(child, live, JobState.CANCELLED, error=f"workflow {job_id} cancelled")
    return moved.ok


def resubmit(ledger: Ledger, job_id: str) -> int | None:
    """Deliberately try again a job that ended ``submit_unknown`` (an operator checked the upstream and
    found no job). Returns the step generation to send ``genq.submit`` with, or None if the job is in
    another state. Its callback is armed afresh, with a new delivery id: the producer was told of the
    ``submit_unknown`` ending and is told of the real one too (a receiver deduplicating on the delivery
    id must not drop it), and a delivery still pending for the old ending is dropped."""
    rec = ledger.get(job_id)
    if rec is None:
        return None
    gen = rec.poll_gen + 1
    moved = ledger.transition(
        job_id,
        [JobState.SUBMIT_UNKNOWN],
        JobState.PENDING,
        submit_attempts=0,
        error=None,
        finished_at=None,
        poll_gen=gen,
        due_at=ledger.clock(),
        callback_state=None,
        callback_attempts=0,
        callback_error=None,
        callback_id=uuid.uuid4().hex if rec.callback else None,
    )
    if not moved.ok:
        return None
    ledger.drop_callback_due(job_id)
    return gen
