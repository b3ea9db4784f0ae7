"""What producer apps import: submit work, read its status, wait for it. Needs no worker code.

>>> from genq.producer import Producer
>>> producer = Producer()                      # settings from GENQ_* env vars / .env
>>> job = producer.submit_image("a red fox in snow", num_images=2)
>>> record = job.wait(timeout=120)             # raises JobFailed / WaitTimeout
>>> [f.path for f in record.outputs]

Tasks are sent by name to their queues, so this module imports Celery but none of genqueue's tasks.
Every request is validated before anything is written or sent; bad input raises ``InvalidRequest``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from pydantic import ValidationError

from config.celeryconf import TASK_QUEUES, celery_config
from config.settings import Settings, get_settings
from genq.errors import GenqError, InvalidRequest, JobFailed, WaitTimeout
from genq.models import ImageRequest, JobKind, JobRecord, JobRequest, JobState
from genq.services import redis_client
from genq.store import Ledger


class EnqueueError(GenqError):
    """The job could not be handed to the workers; the message says whether it was recorded."""


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

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis: redis.Redis = redis_client(self.settings)
        self.ledger = Ledger(self.redis, job_ttl=self.settings.worker.job_ttl)
        self.celery = Celery("genqueue-producer", set_as_current=False)
        self.celery.conf.update(celery_config(self.settings))

    def close(self) -> None:
        self.redis.close()
        self.celery.close()

    # ------------------------------------------------------------------ submit

    def submit_image(self, prompt: str, *, idempotency_key: str | None = None, **options: Any) -> JobHandle:
        """Generate images. Options: ``num_images`` (1-8), ``width``/``height`` (64-2048, multiples of 8),
        ``seed``, ``negative_prompt``, ``model_id``."""
        return self.submit(_validated(ImageRequest, {"prompt": prompt, **options}), idempotency_key)

    def submit(self, request: JobRequest, idempotency_key: str | None = None) -> JobHandle:
        """Record a validated request in the ledger, then send it to the submit queue."""
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 200):
            raise InvalidRequest("idempotency_key must be 1 to 200 characters")
        job_id = uuid.uuid4().hex
        try:
            job_id, created = self.ledger.create(
                job_id,
                JobKind(request.kind),
                request.upstream_body(),
                expected_outputs=request.expected_outputs,
                due_at=time.time(),
                idempotency_key=idempotency_key,
            )
        except redis.RedisError as exc:
            raise EnqueueError(
                f"job not accepted: the ledger is unreachable ({type(exc).__name__})"
            ) from None
        if created:
            self._send(job_id)
        return JobHandle(job_id, created, self)

    def _send(self, job_id: str) -> None:
        try:
            self.celery.send_task("genq.submit", args=[job_id], queue=TASK_QUEUES["genq.submit"])
        except Exception as exc:  # kombu raises several unrelated types for a dead broker
            try:
                self.ledger.transition(
                    job_id,
                    [JobState.PENDING],
                    JobState.FAILED,
                    error=f"could not enqueue: {type(exc).__name__}",
                )
                recorded = "it was marked failed"
            except redis.RedisError:
                recorded = "it stays pending in the ledger"
            raise EnqueueError(f"job {job_id} not enqueued ({type(exc).__name__}); {recorded}") from None

    # ------------------------------------------------------------------ read

    def status(self, job_id: str) -> JobRecord:
        """The job's record; raises ``GenqError`` for an unknown id."""
        record = self.ledger.get(job_id)
        if record is None:
            raise GenqError(f"unknown job {job_id!r}")
        return record

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


def _validated(model: type[ImageRequest], data: dict[str, Any]) -> ImageRequest:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidRequest(f"invalid {model.__name__}: {problems}") from None


_default: Producer | None = None


def default_producer() -> Producer:
    """A process-wide producer built from the environment on first use."""
    global _default
    if _default is None:
        _default = Producer()
    return _default


def submit_image(prompt: str, *, idempotency_key: str | None = None, **options: Any) -> JobHandle:
    return default_producer().submit_image(prompt, idempotency_key=idempotency_key, **options)


def status(job_id: str) -> JobRecord:
    return default_producer().status(job_id)


def wait(job_id: str, timeout: float | None = None) -> JobRecord:
    return default_producer().wait(job_id, timeout=timeout)
