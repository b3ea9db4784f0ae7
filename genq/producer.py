"""What producer apps import: submit work, follow it, cancel it. Needs no worker code.

>>> from genq.producer import Producer
>>> producer = Producer()                      # settings from GENQ_* env vars / .env
>>> job = producer.submit_image("a red fox in snow", num_images=2)
>>> record = job.wait(timeout=120)             # raises JobFailed / WaitTimeout
>>> [f.path for f in record.outputs]

Tasks are sent by name to their queues, so this module imports Celery but none of genqueue's tasks,
and it never needs the API key. Every request is validated before anything is written or sent: bad
input raises :class:`~genq.errors.InvalidRequest` and leaves no trace in Redis or the queues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from genq import control, intake
from genq.budgets import BudgetBook, BudgetReport
from genq.callbacks import check_callback
from genq.celeryconf import TASK_QUEUES, Task, celery_config, lane_priority
from genq.errors import EnqueueError, GenqError, InvalidRequest, JobFailed, WaitTimeout
from genq.intake import AnyRequest
from genq.keys import TOTAL_SCOPE
from genq.ledger import JobEvent
from genq.metrics import sent_at_header
from genq.model_ledger import ModelLedger
from genq.schemas import DEFAULT_PRODUCER, JobKind, JobRecord, JobState, Lane, ModelId, ModelRecord
from genq.services import insecure_tls_warning, ledger_for, limiter_for, redis_client, turn_queue
from genq.settings import Settings, get_settings

log = logging.getLogger(__name__)
__all__ = ["EnqueueError", "JobHandle", "Producer"]


@dataclass(frozen=True)
class JobHandle:
    """A submitted job. ``created`` is False when an idempotency key matched an earlier job."""

    id: str
    created: bool
    producer: Producer

    def status(self) -> JobRecord:
        return self.producer.status(self.id)

    def wait(self, timeout: float | None = None) -> JobRecord:
        return self.producer.wait(self.id, timeout=timeout)


class Producer:
    """Submits jobs and reads their records. Thread-safe; build one per process and reuse it."""

    def __init__(self, settings: Settings | None = None, *, producer_id: str = DEFAULT_PRODUCER) -> None:
        """``producer_id`` names this app for budgets, quotas and fair shares (a submit may name
        another with ``producer=``); its lane and ``on_budget`` default to its policy in
        ``GENQ_BUDGETS_PRODUCERS``, and a submit may override them (``lane="batch"``)."""
        self.settings = settings or get_settings()
        self.producer_id = producer_id
        insecure = insecure_tls_warning(self.settings)
        if insecure:
            log.warning(insecure)
        self.redis: redis.Redis = redis_client(self.settings)
        self.ledger = ledger_for(self.redis, self.settings)
        self.models = ModelLedger(self.redis, grace=self.settings.worker.sweep_grace, clock=self.ledger.clock)
        self.turns = turn_queue(limiter_for(self.redis, self.settings), self.settings)
        self.celery = Celery("genqueue-producer", set_as_current=False)
        self.celery.conf.update(celery_config(self.settings))

    def close(self) -> None:
        self.redis.close()
        self.celery.close()

    # ------------------------------------------------------------------ submit

    def submit_image(self, prompt: str, *, idempotency_key: str | None = None, **options: Any) -> JobHandle:
        """Generate images. Options: ``num_images`` (1-8), ``width``/``height`` (64-2048, multiples of 8),
        ``seed``, ``negative_prompt``, ``model_id`` (a job naming a model still training waits for it)."""
        return self.submit(_request("image", options, prompt=prompt), idempotency_key)

    def submit_upscale(
        self,
        *,
        image_id: str | None = None,
        image_url: str | None = None,
        source_job: str | None = None,
        index: int = 0,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> JobHandle:
        """Upscale one image: an upstream ``image_id``, an ``image_url``, or output ``index`` of an earlier
        genqueue job (``source_job``, which must have succeeded). Options: ``factor`` (2 or 4)."""
        if source_job is not None:
            image_id = self._output_id(source_job, index)
        fixed = {k: v for k, v in (("image_id", image_id), ("image_url", image_url)) if v is not None}
        return self.submit(_request("upscale", options, **fixed), idempotency_key)

    def submit_video(
        self, prompt: str | None = None, *, idempotency_key: str | None = None, **options: Any
    ) -> JobHandle:
        """Generate a video from a prompt and/or a source image (``image_id`` or ``image_url``).
        Options: ``duration`` (seconds, up to 60), ``seed``, ``negative_prompt``, ``model_id``."""
        fixed = {"prompt": prompt} if prompt is not None else {}
        return self.submit(_request("video", options, **fixed), idempotency_key)

    def submit_workflow(
        self,
        prompt: str,
        *,
        upscale_factor: int = 2,
        idempotency_key: str | None = None,
        callback: dict[str, Any] | None = None,
        **image_options: Any,
    ) -> JobHandle:
        """Generate images, then upscale every one: one id to follow; each step is its own linked job.
        The ``callback`` reports the whole workflow's end, once."""
        generate = _request("image", image_options, prompt=prompt)
        del generate["kind"]
        workflow = {"kind": "workflow", "generate": generate, "upscale_factor": upscale_factor}
        return self.submit(
            {**workflow, **({"callback": callback} if callback is not None else {})}, idempotency_key
        )

    def submit(self, request: dict[str, Any] | AnyRequest, idempotency_key: str | None = None) -> JobHandle:
        """Validate a request (a dict with ``kind``, or a request model), record it, then enqueue it."""
        if idempotency_key is not None and not (
            isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 200
        ):
            raise InvalidRequest("invalid request: idempotency_key: must be a string of 1 to 200 characters")
        if isinstance(request, dict):
            request = intake.validate(request)
        check_callback(request.callback, self.settings)
        request = intake.routed(request, self.settings.budgets, self.producer_id)
        try:
            accepted = intake.accept(self.ledger, request, idempotency_key=idempotency_key, turns=self.turns)
            durable = self.ledger.make_durable(
                self.settings.redis.durable_replicas, self.settings.redis.durable_timeout
            )
        except redis.RedisError as exc:
            raise EnqueueError(
                f"job not accepted: the ledger is unreachable ({type(exc).__name__})"
            ) from None
        if not durable:  # a failover now could lose the record: the caller must not count on it yet
            raise EnqueueError(f"job {accepted.id} not yet on a replica; submit it again with the same key")
        for job_id in accepted.to_submit:
            self._send(job_id, batch=request.lane is Lane.BATCH)
        if accepted.tick:  # queued for its turn, and the queue's tick is this job's to start
            self._message(accepted.id, Task.ADMIT, ["trigger", accepted.tick])
        return JobHandle(accepted.id, accepted.created, self)

    def _send(self, job_id: str, gen: int = 0, batch: bool = False) -> None:
        self._message(job_id, Task.SUBMIT, [job_id, gen], lane_priority(batch))

    def _message(self, job_id: str, task: Task, args: list[Any], priority: int | None = None) -> None:
        """Send one of ``job_id``'s messages."""
        try:
            self.celery.send_task(
                task, args=args, queue=TASK_QUEUES[task], headers=sent_at_header(), priority=priority
            )
        except Exception as exc:  # kombu raises several unrelated types for a dead broker
            # The job is recorded and due: the sweeper sends it (or starts the queue's tick) once the
            # broker is back. Failing it here would also tie its idempotency key to a failed job for
            # the key's whole life.
            log.warning(
                "job %s recorded, but the broker refused its message (%s); the sweeper will send it",
                job_id,
                type(exc).__name__,
            )

    def _output_id(self, job_id: str, index: int) -> str:
        record = self.status(job_id)
        if record.state is not JobState.SUCCEEDED:
            raise InvalidRequest(
                f"invalid request: source_job {job_id} is {record.state.value}, not succeeded"
            )
        if not 0 <= index < len(record.remote_ids):
            raise InvalidRequest(f"invalid request: source_job {job_id} has no output {index}")
        return record.remote_ids[index]

    # ------------------------------------------------------------------ budgets

    def budget(self, producer_id: str | None = None) -> BudgetReport:
        """What this producer (or ``producer_id``) may still spend: its in-flight jobs against its
        quota and its hour and day windows against their caps, with the total's windows."""
        book = BudgetBook(self.redis, self.settings.budgets)
        now = self.ledger.clock()
        usage = book.usage(producer_id or self.producer_id, now)
        return BudgetReport(producer=usage, total=book.windows(TOTAL_SCOPE, now))

    # ------------------------------------------------------------------ models

    def train_model(self, model_id: str, *, force: bool = False) -> ModelRecord:
        """Start training ``model_id`` unless it is already training (or ready, unless ``force``).
        Any number of concurrent calls make one upstream train call and one poll chain."""
        model_id = _model_id(model_id)
        gen = self.models.request(model_id, deadline=self.settings.poll.model.deadline, force=force)
        if gen:
            self.celery.send_task(
                Task.TRAIN, args=[model_id, gen], queue=TASK_QUEUES[Task.TRAIN], headers=sent_at_header()
            )
        return self.model_status(model_id)

    def model_status(self, model_id: str) -> ModelRecord:
        record = self.models.get(_model_id(model_id))
        if record is None:
            raise GenqError(f"unknown model {model_id!r}: never trained through genqueue")
        return record

    def list_models(self, limit: int = 100) -> list[ModelRecord]:
        return [m for m in (self.models.get(i, history=0) for i in self.models.list_ids(limit)) if m]

    # ------------------------------------------------------------------ read and follow

    def status(self, job_id: str) -> JobRecord:
        """The job's record; raises ``GenqError`` for an unknown id."""
        record = self.ledger.get(job_id)
        if record is None:
            raise GenqError(f"unknown job {job_id!r}")
        return record

    def list_jobs(
        self,
        *,
        state: str | Iterable[str] | None = None,
        kind: str | Iterable[str] | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        """Recent jobs, newest first, optionally filtered by state(s) and kind(s)."""
        states = {JobState(s) for s in _names(state, JobState)} if state else None
        kinds = {JobKind(k) for k in _names(kind, JobKind)} if kind else None
        return self.ledger.list_records(states=states, kinds=kinds, limit=limit)

    def wait(self, job_id: str, timeout: float | None = None, interval: float = 0.25) -> JobRecord:
        """Block this (producer) thread until the job ends; return it if it succeeded.

        Raises ``JobFailed`` for failed, timed-out, cancelled or submit_unknown jobs and ``WaitTimeout``
        when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(interval, 0.05)
        while True:
            record = self.status(job_id)
            if record.terminal:
                if record.state is not JobState.SUCCEEDED:
                    raise JobFailed(job_id, record.state.value, record.error)
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} still {record.state.value} after {timeout}s")
            time.sleep(delay)
            delay = min(interval, delay * 2)

    def watch(
        self, job_ids: Iterable[str] | None = None, *, timeout: float | None = None
    ) -> Iterator[JobEvent]:
        """Yield state changes from the event stream as they happen: of the given jobs (and their
        workflow steps), or of every job. Ends when all given jobs are terminal, or after ``timeout``."""
        watched = set(job_ids) if job_ids is not None else None
        after = self.ledger.last_event_id()
        deadline = None if timeout is None else time.monotonic() + timeout
        open_jobs = {j for j in watched or () if not self.status(j).terminal}
        if watched is not None and not open_jobs:
            return
        while deadline is None or time.monotonic() < deadline:
            for event in self.ledger.read_events(after, block_ms=500):
                after = event.stream_id
                if watched is None or event.job_id in watched or event.parent_id in watched:
                    yield event
                    if event.job_id in open_jobs and JobState(event.to_state).terminal:
                        open_jobs.discard(event.job_id)
            if watched is not None and not open_jobs:
                return

    def resubmit(self, job_id: str) -> bool:
        """Submit again a job that ended ``submit_unknown``, after checking upstream that it never
        started: the one deliberate way to risk a second paid POST. False for any other state."""
        self.status(job_id)
        gen = control.resubmit(self.ledger, job_id)
        if gen is None:
            return False
        self._send(job_id, gen, self.status(job_id).batch)
        return True

    def cancel(self, job_id: str) -> bool:
        """Stop a job: it ends ``cancelled`` and later poll deliveries do nothing. A workflow step cancels
        its workflow. Returns False if the job had already ended."""
        record = self.status(job_id)
        cancelled = control.cancel(self.ledger, job_id)
        top = record.parent_id or job_id
        if cancelled and self.status(top).callback_state == "pending":
            # Report it now rather than at the next sweep.
            self.celery.send_task(Task.CALLBACK, args=[top], queue=TASK_QUEUES[Task.CALLBACK])
        return cancelled


def _request(kind: str, options: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """A request dict; an option may not override the kind or an argument given by name."""
    clash = sorted(set(options) & {"kind", *fixed})
    if clash:
        raise InvalidRequest(f"invalid request: {', '.join(clash)}: not an option here")
    return {**options, **fixed, "kind": kind}


def _names(value: str | Iterable[str], enum: type[JobState] | type[JobKind]) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in enum._value2member_map_]
    if unknown:
        raise InvalidRequest(
            f"invalid request: unknown {enum.__name__} {unknown}; one of {list(enum._value2member_map_)}"
        )
    return names


def _model_id(model_id: str) -> str:
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(ModelId).validate_python(model_id)
    except ValidationError:
        raise InvalidRequest(
            f"invalid request: model_id {str(model_id)[:80]!r} is not a valid model id"
        ) from None


_default: Producer | None = None


def default_producer() -> Producer:
    """A process-wide producer built from the environment on first use."""
    global _default
    if _default is None:
        _default = Producer()
    return _default


def submit_image(prompt: str, *, idempotency_key: str | None = None, **options: Any) -> JobHandle:
    return default_producer().submit_image(prompt, idempotency_key=idempotency_key, **options)


def submit_upscale(**options: Any) -> JobHandle:
    return default_producer().submit_upscale(**options)


def submit_video(prompt: str | None = None, **options: Any) -> JobHandle:
    return default_producer().submit_video(prompt, **options)


def submit_workflow(prompt: str, **options: Any) -> JobHandle:
    return default_producer().submit_workflow(prompt, **options)


def train_model(model_id: str, *, force: bool = False) -> ModelRecord:
    return default_producer().train_model(model_id, force=force)


def status(job_id: str) -> JobRecord:
    return default_producer().status(job_id)


def wait(job_id: str, timeout: float | None = None) -> JobRecord:
    return default_producer().wait(job_id, timeout=timeout)


def watch(job_ids: Iterable[str] | None = None, *, timeout: float | None = None) -> Iterator[JobEvent]:
    return default_producer().watch(job_ids, timeout=timeout)


def cancel(job_id: str) -> bool:
    return default_producer().cancel(job_id)


def list_jobs(**filters: Any) -> list[JobRecord]:
    return default_producer().list_jobs(**filters)


def model_status(model_id: str) -> ModelRecord:
    return default_producer().model_status(model_id)


def list_models(limit: int = 100) -> list[ModelRecord]:
    return default_producer().list_models(limit)
