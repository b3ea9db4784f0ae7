"""The job pipeline as plain Python: submit, poll, download, finalize. No Celery here.

Each step reads the ledger, does at most one upstream call, moves the record by compare-and-set and
returns the :mod:`genq.actions` to take next. A step that finds the record in another state (a
duplicate or stale delivery) changes nothing and returns no action.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import redis
import requests

from genq import downloads, retry
from genq.actions import Action, Admit, Download, Notify, PollLater, SubmitLater
from genq.api import UpstreamClient
from genq.budgets import BudgetBook
from genq.durations import PollPlanner
from genq.errors import (
    DownloadRefused,
    GenqError,
    PermanentError,
    ProtocolError,
    Throttled,
    TransientError,
    UpstreamUnavailable,
)
from genq.ledger import KEEP, Ledger, Transition, queue_note
from genq.metrics import Recorder
from genq.netguard import NetPolicy, policy_from
from genq.polling import clamp_to_deadline
from genq.schemas import (
    DEFAULT_PRODUCER,
    POLLING_STATES,
    JobKind,
    JobRecord,
    JobState,
    OnBudget,
    OutputFile,
    UpstreamJob,
)
from genq.settings import PollPolicy, Settings
from genq.workflows import WorkflowService

log = logging.getLogger(__name__)

MEDIA: dict[JobKind, str] = {JobKind.IMAGE: "image", JobKind.UPSCALE: "image", JobKind.VIDEO: "video"}
TRIGGERED_KINDS = frozenset(MEDIA)
MAX_SUBMIT_ATTEMPTS = 5
QUOTA_WAIT_CAP = 10.0
"""Longest wait, in seconds, of a job finding its producer's quota full (it backs off up to this)."""
RECORD_RETRY_SECONDS = 20.0  # the submit task's soft time limit leaves 30 s after the POST's timeouts


@dataclass
class JobService:
    """Runs one step of a job at a time against the ledger and the upstream."""

    settings: Settings
    ledger: Ledger
    api: UpstreamClient
    files: requests.Session
    clock: Callable[[], float]
    rng: random.Random
    workflows: WorkflowService
    recorder: Recorder | None = None  # counts downloads for `genq metrics`

    # ------------------------------------------------------------------ submit

    def submit(self, job_id: str, gen: int = 0) -> list[Action]:
        """Make the paid POST, once. ``gen`` is the step generation the message was sent for: a message
        of an older chain (the sweeper re-drove the job since) does nothing."""
        rec = self.ledger.get(job_id)
        if rec is None or rec.kind not in TRIGGERED_KINDS:
            log.warning("submit: no submittable job %s in the ledger; nothing to do", job_id)
            return []
        if rec.state is JobState.PENDING and rec.upstream_id:
            # The POST was made and answered, but the move to submitting was lost (a promoted replica
            # missed it): take up the upstream job rather than pay for a second one.
            log.warning(
                "job %s is pending with upstream id %s: polling it, not posting again",
                job_id,
                rec.upstream_id,
            )
            return self._submitted(rec, rec.upstream_id, rec.upstream_status or "created")
        now = self.clock()
        moved = self.ledger.transition(
            job_id,
            [JobState.PENDING],
            JobState.SUBMITTING,
            expect_gen=gen,
            parent_live=True,
            budget=self.budgets.plan(rec, now).to_json(),
            submit_attempts=rec.submit_attempts + 1,
            due_at=now + self._submit_window(),
        )
        if moved.reason == "parent":
            reason = f"workflow {rec.parent_id} ended before this step was submitted"
            return self._end(rec, JobState.CANCELLED, [JobState.PENDING], reason)
        if moved.reason in ("budget", "quota", "unsettled"):
            return self._held_back(rec, gen, moved)
        if not moved.ok:
            return [] if moved.reason == "stale" else self._submit_found(rec)
        replicas = self.settings.redis.durable_replicas
        if not self.ledger.make_durable(replicas, self.settings.redis.durable_timeout):
            # A failover now could lose the move to submitting and let the job be posted again.
            exc = UpstreamUnavailable(f"ledger write not on {replicas} replica(s) yet; nothing posted")
            return self._submit_retry(rec, exc)
        producer = rec.producer if self.settings.budgets.fair_shares else ""
        try:
            upstream = self.api.trigger(rec.kind, rec.request, rec.lane.value, rec.id)
        except UpstreamUnavailable as exc:
            if exc.ambiguous and not self.settings.api.submit_at_least_once:
                return self._unknown(rec, str(exc))
            return self._submit_retry(rec, exc)
        except ProtocolError as exc:
            # A 2xx answer we cannot read: the upstream accepted the POST, so it may be paid for.
            return self._unknown(rec, f"unreadable answer: {exc}")
        except Throttled as exc:
            return self._queue(rec, producer, exc) if exc.queued else self._submit_retry(rec, exc)
        except GenqError as exc:
            return self._submit_retry(rec, exc)
        return self._record_submitted(rec, upstream.job_id, upstream.status.value)

    def _queue(self, rec: JobRecord, producer: str, exc: Throttled) -> list[Action]:
        """Refused by the rate limit: back to pending, nothing sent and no message, to wait in the
        admission queue until the tick grants its turn and sends it (:mod:`genq.limits`). A queue
        of thousands costs one step per job, not a retry per window. The ledger holds the job for
        twice the queue's length: should its turn never come (the queue lost in a failover), the
        sweeper sends it again and it queues again, keeping its place."""
        gen = rec.poll_gen + 1
        eta = exc.retry_after or 0.0
        moved = self.ledger.transition(
            rec.id,
            [JobState.SUBMITTING],
            JobState.PENDING,
            refund=True,
            error=queue_note(eta),
            submit_attempts=rec.submit_attempts,  # nothing was sent: the try does not count
            poll_gen=gen,
            due_at=self.clock() + 2 * eta + self.ledger.grace,
            held=True,
        )
        limiter = self.api.limiter
        if not moved.ok or limiter is None:
            return []
        token = limiter.park("trigger", rec.id, gen, rec.lane.value, producer or DEFAULT_PRODUCER)
        return [Admit("trigger", token)] if token else []

    def admit(self, family: str, token: str) -> list[Action]:
        """One admission tick: send the submits granted their turn, ahead of any batch backlog (the
        turn is theirs now), then the next tick."""
        limiter = self.api.limiter
        if limiter is None:
            return []
        tick = limiter.tick(family, token)
        actions: list[Action] = [
            SubmitLater(g.job_id, 0.0, g.gen, batch=g.lane == "batch", turn=True) for g in tick.grants
        ]
        if tick.next_in is not None:
            actions.append(Admit(family, tick.token, tick.next_in))
        return actions

    def rearm_admission(self) -> list[Action]:
        """The sweeper's check that queued submits have a tick coming (its message may be lost)."""
        limiter = self.api.limiter
        token = limiter.rearm("trigger") if limiter is not None and limiter.queues("trigger") else None
        return [Admit("trigger", token)] if token else []

    def _held_back(self, rec: JobRecord, gen: int, moved: Transition) -> list[Action]:
        """Not sent: a budget or the producer's quota said no. Past a budget the job ends ``rejected``
        naming it, or (``on_budget=wait``) waits for the window's end; over its quota, or while only
        unanswered POSTs fill a cap, it tries again soon. Waiting costs no attempt."""
        if moved.reason == "budget" and rec.on_budget is OnBudget.REJECT:
            reason = f"budget exceeded: {moved.detail}"
            return self._end(rec, JobState.REJECTED, [JobState.PENDING], reason, expect_gen=gen)
        now = self.clock()
        if moved.reason == "budget":
            delay = max(0.0, (moved.until or now) - now) + self.rng.uniform(0.0, 5.0)
            note = f"waiting for budget {moved.detail} (window ends in {delay:.0f}s)"
        else:
            # Backs off while it keeps finding no room, so a long queue behind a quota stays cheap.
            waits = rec.budget_waits + 1
            delay = min(QUOTA_WAIT_CAP, 0.25 * 2 ** min(waits, 8)) * self.rng.uniform(0.5, 1.0)
            note = f"waiting for {moved.detail}" if moved.reason == "quota" else "waiting for POSTs to settle"
        held = self.settings.poll.held(delay)
        moved_on = self.ledger.transition(
            rec.id,
            [JobState.PENDING],
            JobState.PENDING,
            expect_gen=gen,
            poll_gen=gen + 1,
            budget_waits=rec.budget_waits + 1,
            error=note,
            due_at=now + delay,
            held=held,
        )
        if not moved_on.ok:
            return []
        log.info("job %s not submitted yet: %s", rec.id, note)
        return [] if held else [SubmitLater(rec.id, delay, gen + 1, rec.batch)]

    def _record_submitted(self, rec: JobRecord, upstream_id: str, status: str) -> list[Action]:
        """The POST was answered: its id is the only handle on a paid job. A ledger failing over (a
        Sentinel election takes seconds) is retried, within the task's time limit (30 s past the POST's
        timeouts), rather than leaving the job to end submit_unknown, paid and never fetched."""
        give_up = time.monotonic() + RECORD_RETRY_SECONDS
        while True:
            try:
                return self._submitted(rec, upstream_id, status)
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() >= give_up:
                    log.error("job %s: upstream job %s not recorded, ledger unreachable", rec.id, upstream_id)
                    raise
                log.warning("job %s: no ledger; recording upstream job %s again", rec.id, upstream_id)
                time.sleep(0.5)

    def _submitted(self, rec: JobRecord, upstream_id: str, status: str) -> list[Action]:
        now = self.clock()
        policy = self.policy(rec.kind)
        deadline_at = now + policy.deadline
        delay = clamp_to_deadline(self.planner.first_delay(rec, policy, self.rng), now, deadline_at)
        actions = self._schedule_poll(
            rec,
            # Pending too: the move to submitting may have been lost while the POST went through.
            [JobState.SUBMITTING, JobState.PENDING],
            JobState.SUBMITTED,
            delay,
            expect_gen=None,
            upstream_id=upstream_id,
            upstream_status=status,
            deadline_at=deadline_at,
            submitted_at=now,
            error=None,
        )
        if actions is None:
            # Only a cancel or an operator moves a job out of submitting meanwhile; keep the id for them.
            log.error("job %s left submitting during the POST; upstream id %s kept", rec.id, upstream_id)
            self.ledger.set_fields(rec.id, upstream_id=upstream_id)
            return []
        log.info("job %s submitted as upstream %s; first poll in %.1fs", rec.id, upstream_id, delay)
        return actions

    def _submit_retry(self, rec: JobRecord, exc: GenqError) -> list[Action]:
        """Back to pending for a later try, as a new step generation (so a duplicate chain dies), or
        the end. A throttled try (nothing was sent) is not counted."""
        verdict = retry.after(
            exc,
            rec.submit_attempts,
            limit=MAX_SUBMIT_ATTEMPTS,
            backoff=self.settings.poll.error_backoff,
            cap=60.0,
            rng=self.rng,
        )
        # Only an answer that may have started the upstream job keeps its budget charge.
        refund = not getattr(exc, "ambiguous", False)
        if isinstance(verdict, retry.GiveUp):
            reason = f"submit {verdict.reason}"
            return self._end(rec, JobState.FAILED, [JobState.SUBMITTING], reason, refund=refund)
        gen = rec.poll_gen + 1
        held = self.settings.poll.held(verdict.delay)
        moved = self.ledger.transition(
            rec.id,
            [JobState.SUBMITTING],
            JobState.PENDING,
            refund=refund,
            error=str(exc),
            submit_attempts=verdict.errors,
            poll_gen=gen,
            due_at=self.clock() + verdict.delay,
            held=held,
        )
        if not moved.ok:
            return []
        log.warning("job %s: submit not accepted (%s); again in %.1fs", rec.id, exc, verdict.delay)
        return [] if held else [SubmitLater(rec.id, verdict.delay, gen, rec.batch)]

    def _unknown(self, rec: JobRecord, detail: str) -> list[Action]:
        return self._end(rec, JobState.SUBMIT_UNKNOWN, [JobState.SUBMITTING], _unknown_reason(detail))

    def settle_stalled_submit(self, job_id: str) -> list[Action]:
        """The sweeper's move for a job still ``submitting`` after its submit window: its worker died
        mid-POST. One compare-and-set, no message: a message per sweep would pile up behind a slow
        submit queue, and a message is not needed to end a job."""
        rec = self.ledger.get(job_id)
        return self._submit_found(rec) if rec is not None else []

    def _submit_found(self, rec: JobRecord) -> list[Action]:
        """A submit delivered for a job that is not pending: a duplicate, or a crash mid-POST."""
        current = self.ledger.get(rec.id)
        if current is None or current.state is not JobState.SUBMITTING:
            return []
        if self.clock() - current.updated_at < self._submit_window():
            return []  # another delivery is making the POST right now
        # The worker that moved it to submitting died before recording an answer. The POST may have
        # been made and paid for; repeating it could pay twice, so stop and say so (unless the
        # settings accept paying twice over losing a job).
        if self.settings.api.submit_at_least_once:
            gen = current.poll_gen + 1
            moved = self.ledger.transition(
                rec.id,
                [JobState.SUBMITTING],
                JobState.PENDING,
                error="submit interrupted; retrying",
                poll_gen=gen,
                due_at=self.clock(),
            )
            return [SubmitLater(rec.id, 0.0, gen, rec.batch)] if moved.ok else []
        return self._unknown(current, "the submitting worker stopped before recording the upstream's answer")

    @cached_property
    def budgets(self) -> BudgetBook:
        return BudgetBook(self.ledger.redis, self.settings.budgets)

    def _submit_window(self) -> float:
        return self.settings.api.connect_timeout + self.settings.api.read_timeout + 5.0

    # ------------------------------------------------------------------ poll

    def poll(self, job_id: str, gen: int) -> list[Action]:
        rec = self.ledger.get(job_id)
        if rec is None or rec.state not in POLLING_STATES or rec.poll_gen != gen or not rec.upstream_id:
            return []  # finished, cancelled, or a stale/duplicate poll
        now = self.clock()
        if rec.deadline_at is not None and now >= rec.deadline_at:
            policy = self.policy(rec.kind)
            return self._end(
                rec,
                JobState.TIMED_OUT,
                POLLING_STATES,
                reason=f"no result within {policy.deadline:.0f}s",
                expect_gen=gen,
            )
        try:
            upstream = self.api.get_job(rec.upstream_id, rec.lane.value)
        except GenqError as exc:
            return self._poll_error(rec, exc)
        if upstream.status.working:
            return self._poll_again(rec, upstream)
        self.planner.finished(rec, self.policy(rec.kind), now)
        if upstream.status.value == "failed":
            reason = f"upstream job failed: {upstream.error or 'no reason given'}"
            return self._end(
                rec,
                JobState.FAILED,
                POLLING_STATES,
                reason=reason,
                expect_gen=gen,
                upstream_status="failed",
                polls=rec.polls + 1,
            )
        return self._succeeded_upstream(rec, upstream)

    def _poll_again(self, rec: JobRecord, upstream: UpstreamJob) -> list[Action]:
        now = self.clock()
        polls = rec.polls + 1
        delay = self.planner.next_delay(rec, self.policy(rec.kind), polls, now, self.rng)
        delay = clamp_to_deadline(delay, now, rec.deadline_at or now + delay)
        state = JobState.SUBMITTED if upstream.status.value == "created" else JobState.RUNNING
        actions = self._schedule_poll(
            rec,
            POLLING_STATES,
            state,
            delay,
            polls=polls,
            errors_in_row=0,
            upstream_status=upstream.status.value,
        )
        return actions or []

    def _poll_error(self, rec: JobRecord, exc: GenqError) -> list[Action]:
        poll = self.settings.poll
        cap = self.policy(rec.kind).max_interval * 4
        verdict = retry.after(
            exc, rec.errors_in_row, limit=poll.max_errors, backoff=poll.error_backoff, cap=cap
        )
        if isinstance(verdict, retry.GiveUp):
            reason = f"status check {verdict.reason}"
            return self._end(rec, JobState.FAILED, POLLING_STATES, reason=reason, expect_gen=rec.poll_gen)
        now = self.clock()
        # Never past the deadline: the check at the deadline is the one that times the job out.
        delay = clamp_to_deadline(verdict.delay, now, rec.deadline_at or now + verdict.delay)
        fields: dict[str, Any] = {}
        if verdict.counted:
            fields = {"errors_in_row": verdict.errors, "error": str(exc)}
            log.warning(
                "job %s: status check error %d (%s); again in %.1fs", rec.id, verdict.errors, exc, delay
            )
        return self._schedule_poll(rec, [rec.state], rec.state, delay, **fields) or []

    def _schedule_poll(
        self,
        rec: JobRecord,
        allowed: Iterable[JobState],
        state: JobState,
        delay: float,
        *,
        expect_gen: int | object | None = KEEP,
        **fields: Any,
    ) -> list[Action] | None:
        """Record the next poll and start a new poll generation, so any older poll message is stale.

        A short wait is a countdown message. A long one (over ``poll.countdown_max``) is held in Redis
        only, by its due time, and the sweeper dispatches it: a worker holds countdown messages in
        memory and a broker redelivers them after the visibility timeout, so long waits cost neither.
        Returns None when the record had moved on (nothing scheduled).
        """
        gen = rec.poll_gen + 1
        held = self.settings.poll.held(delay)
        moved = self.ledger.transition(
            rec.id,
            allowed,
            state,
            expect_gen=rec.poll_gen if expect_gen is KEEP else expect_gen,  # type: ignore[arg-type]
            poll_gen=gen,
            next_poll_at=self.clock() + delay,
            due_at=self.clock() + delay,
            held=held,
            **fields,
        )
        if not moved.ok:
            return None
        return [] if held else [PollLater(rec.id, gen, delay, rec.batch)]

    def _succeeded_upstream(self, rec: JobRecord, upstream: UpstreamJob) -> list[Action]:
        outputs = upstream.videos if rec.kind is JobKind.VIDEO else upstream.images
        if not outputs:
            return self._end(
                rec,
                JobState.FAILED,
                POLLING_STATES,
                reason="upstream reported success with no outputs",
                expect_gen=rec.poll_gen,
            )
        # URLs first: a download task must find its URL the moment the state says downloading.
        self.ledger.set_urls(rec.id, {i: out.url for i, out in enumerate(outputs)})
        now = self.clock()
        moved = self.ledger.transition(
            rec.id,
            POLLING_STATES,
            JobState.DOWNLOADING,
            expect_gen=rec.poll_gen,
            poll_gen=rec.poll_gen + 1,
            polls=rec.polls + 1,
            upstream_status="success",
            expected_outputs=len(outputs),
            remote_ids=[out.id for out in outputs],
            errors_in_row=0,
            error=None,
            # Due at once: if no download runs within the grace (its worker died), the sweeper sends
            # the missing ones again; a duplicate of a download still running finds it locked.
            due_at=now,
        )
        if not moved.ok:
            return []
        log.info("job %s: upstream succeeded with %d outputs; downloading", rec.id, len(outputs))
        return [Download(rec.id, i, batch=rec.batch) for i in range(len(outputs))]

    # ------------------------------------------------------------------ download / finalize

    def download(self, job_id: str, index: int, attempt: int = 0) -> list[Action]:
        """Fetch one output. Tries are counted in the ledger when one starts (not in the message), so
        however the messages come (retries, sweeper re-drives, a worker dying mid-file every time) an
        output gets at most ``download.max_attempts`` tries. ``attempt`` is kept for old messages."""
        rec = self.ledger.get(job_id)
        if rec is None or rec.state is not JobState.DOWNLOADING:
            return []
        if any(out.index == index for out in rec.outputs):
            return self.finalize(job_id) if len(rec.outputs) >= rec.expected_outputs else []
        url = self.ledger.get_url(job_id, index)
        if url is None:
            return self._end(rec, JobState.FAILED, [JobState.DOWNLOADING], f"output {index}: no URL recorded")
        limit = self.settings.download.max_attempts
        tries = 0

        def started() -> None:
            nonlocal tries
            tries = self.ledger.count_try(job_id, f"try:{index}")
            if tries > limit:
                raise DownloadRefused(f"no try of {limit} finished (the worker stopped mid-file)")

        try:
            got = downloads.fetch(
                self.files,
                url,
                self.settings.download.dir / job_id,
                f"{index:02d}",
                self.download_rules(),
                MEDIA[rec.kind],
                on_locked=started,
            )
        except downloads.Busy:
            return []  # a duplicate delivery is already downloading this file
        except OSError as exc:
            # Our own disk (no space, read-only, permissions, too many open files): maybe passing.
            if tries == 0:  # before the file was ours (its folder, its temp file): a try all the same
                tries = self.ledger.count_try(job_id, f"try:{index}")
            return self._download_retry(rec, index, tries, TransientError(f"local I/O error: {exc}"))
        except TransientError as exc:
            return self._download_retry(rec, index, tries, exc)
        except PermanentError as exc:
            return self._end(rec, JobState.FAILED, [JobState.DOWNLOADING], f"output {index}: {exc}")
        output = OutputFile(
            index=index,
            remote_id=rec.remote_ids[index] if index < len(rec.remote_ids) else "",
            path=str(got.path),
            bytes=got.bytes,
            sha256=got.sha256,
            content_type=got.content_type,
        )
        remaining = self.ledger.record_output(job_id, output)
        if remaining >= 0 and self.recorder is not None:
            self.recorder.download(got.bytes)
        # The last output finalizes the job in this same task: a task of its own would cost a broker
        # round trip and a worker slot for a record read and one ledger step. The Finalize task is
        # left for the sweeper, for a job whose last download ended before it could finalize.
        return self.finalize(job_id) if remaining == 0 else []

    def _download_retry(self, rec: JobRecord, index: int, tries: int, exc: TransientError) -> list[Action]:
        verdict = retry.after(
            exc,
            max(tries, 1) - 1,  # the tries before this one
            limit=self.settings.download.max_attempts,
            backoff=self.settings.poll.error_backoff,
            cap=60.0,
            rng=self.rng,
        )
        if isinstance(verdict, retry.GiveUp):
            return self._end(rec, JobState.FAILED, [JobState.DOWNLOADING], f"output {index} {verdict.reason}")
        log.warning("job %s output %d: %s; again in %.1fs", rec.id, index, exc, verdict.delay)
        return [Download(rec.id, index, tries, verdict.delay, rec.batch)]

    def finalize(self, job_id: str) -> list[Action]:
        rec = self.ledger.get(job_id)
        if rec is None or rec.state is not JobState.DOWNLOADING:
            return []
        if len(rec.outputs) < rec.expected_outputs:
            return []  # a later download will finalize
        missing = [o.path for o in rec.outputs if not Path(o.path).is_file()]
        if missing:
            return self._end(
                rec, JobState.FAILED, [JobState.DOWNLOADING], f"downloaded files vanished: {missing}"
            )
        moved = self.ledger.transition(job_id, [JobState.DOWNLOADING], JobState.SUCCEEDED, error=None)
        if not moved.ok:
            return []
        log.info("job %s succeeded with %d files", job_id, len(rec.outputs))
        return self._ended(rec, JobState.SUCCEEDED, None)

    # ------------------------------------------------------------------ helpers

    @cached_property
    def planner(self) -> PollPlanner:
        """When to check each job (learned durations, or the fixed policies)."""
        return PollPlanner(self.ledger.redis, self.settings.poll)

    def policy(self, kind: JobKind) -> PollPolicy:
        poll = self.settings.poll
        return {JobKind.IMAGE: poll.image, JobKind.UPSCALE: poll.upscale, JobKind.VIDEO: poll.video}[kind]

    def download_rules(self) -> downloads.DownloadRules:
        d = self.settings.download
        return downloads.DownloadRules(
            max_bytes=d.max_bytes, timeout=d.timeout, chunk_bytes=d.chunk_bytes, net=net_policy(self.settings)
        )

    def _end(
        self,
        rec: JobRecord,
        to: JobState,
        allowed: Iterable[JobState],
        reason: str,
        expect_gen: int | None = None,
        refund: bool = False,
        **fields: Any,
    ) -> list[Action]:
        """Move the job to a terminal state with its reason (if it is still in ``allowed``)."""
        moved = self.ledger.transition(
            rec.id, allowed, to, expect_gen=expect_gen, refund=refund, error=reason, **fields
        )
        if not moved.ok:
            return []
        log.warning("job %s %s: %s", rec.id, to.value, reason)
        for leftover in (self.settings.download.dir / rec.id).glob(".*.part"):
            leftover.unlink(missing_ok=True)  # kept for resuming; no use once the job has ended
        return self._ended(rec, to, reason)

    def _ended(self, rec: JobRecord, to: JobState, error: str | None) -> list[Action]:
        """``rec`` (as read before) just moved to ``to``: report it to its producer, or let its workflow
        go on. The move itself marked a callback pending, if the job has one not yet sent."""
        actions: list[Action] = [Notify(rec.id)] if rec.callback and not rec.callback_state else []
        if rec.parent_id:
            actions += self.workflows.step_ended(rec.model_copy(update={"state": to, "error": error}))
        return actions

    # ------------------------------------------------------------------ parked jobs and cancels

    def release(self, job_id: str) -> list[Action]:
        """A parked job's model is ready: submit it."""
        rec = self.ledger.get(job_id)
        if rec is None:
            return []
        gen = rec.poll_gen + 1
        moved = self.ledger.transition(
            job_id, [JobState.PARKED], JobState.PENDING, poll_gen=gen, due_at=self.clock()
        )
        return [SubmitLater(job_id, 0.0, gen, rec.batch)] if moved.ok else []

    def abandon(self, job_id: str, reason: str) -> list[Action]:
        """End a job that cannot make progress, whatever step it is at."""
        rec = self.ledger.get(job_id)
        live = [s for s in JobState if not s.terminal]
        return self._end(rec, JobState.FAILED, live, reason) if rec else []

    def fail_parked(self, job_id: str, reason: str) -> list[Action]:
        rec = self.ledger.get(job_id)
        return self._end(rec, JobState.FAILED, [JobState.PARKED], reason) if rec else []


def net_policy(settings: Settings) -> NetPolicy:
    """Where output files may be fetched from."""
    return policy_from(settings.download, settings.download.max_redirects)


def _unknown_reason(detail: str) -> str:
    return (
        f"submit outcome unknown ({detail}); the upstream may or may not have started the job. "
        "Not retried automatically, so it is never paid twice: "
        "check upstream, then `genq resubmit ID` if needed"
    )
