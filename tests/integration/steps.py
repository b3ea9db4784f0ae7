"""Shared harness for the step-level service tests (``test_*_steps.py``, ``test_model_ledger.py``): every
service wired as :class:`genq.services.Services` wires it, over a real redis-server on a free port, with
a fake clock and ``responses`` standing in for the upstream. No Celery, no worker processes.

One redis-server per test module (flushed before each test) keeps the files fast. Test modules import
the fixtures they use from here (``steps_fixture`` gives ``steps``, and so on).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import responses

from genq import keys
from genq.api import UpstreamClient
from genq.callbacks import CallbackService
from genq.embedded import EmbeddedRedis
from genq.jobs import JobService
from genq.ledger import Ledger
from genq.limits import Limits, UpstreamLimiter
from genq.model_ledger import ModelLedger
from genq.schemas import JobKind, JobRecord, JobState, ModelRecord
from genq.services import ledger_for, redis_client
from genq.settings import Settings, load_settings
from genq.sweeper import Sweeper
from genq.training import TrainingService
from genq.workflows import WorkflowService
from tests.helpers import environment

API = "https://api.test"
GRACE = 30.0
MODEL_DEADLINE = 600.0
SECRET = "whsec-steps-7d2"
START = 1_000_000.0

BASE_ENV = {
    "GENQ_API_BASE_URL": API,
    "GENQ_API_KEY": "k",
    "GENQ_POLL_IMAGE": json.dumps(
        {"first_delay": 2, "interval": 2, "max_interval": 4, "deadline": 30, "jitter": 0}
    ),
    # Checks 10 s apart: short enough to be countdowns (held() is for waits over 60 s).
    "GENQ_POLL_MODEL": json.dumps(
        {"first_delay": 10, "interval": 10, "max_interval": 10, "deadline": MODEL_DEADLINE, "jitter": 0}
    ),
    "GENQ_POLL_MAX_ERRORS": "3",
    "GENQ_POLL_ERROR_BACKOFF": "2",
    "GENQ_WORKER_SWEEP_GRACE": str(GRACE),
    "GENQ_CALLBACKS_SECRET": SECRET,
    "GENQ_CALLBACKS_MAX_ATTEMPTS": "3",
    "GENQ_CALLBACKS_BACKOFF": "2",
}


class Clock:
    """The fake clock every service of a test reads."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class Steps:
    """The service graph of one test."""

    settings: Settings
    clock: Clock
    redis: redis.Redis
    ledger: Ledger
    models: ModelLedger
    limiter: UpstreamLimiter
    api: UpstreamClient
    workflows: WorkflowService
    jobs: JobService
    training: TrainingService
    sweeper: Sweeper
    callbacks: CallbackService

    @classmethod
    def build(cls, settings: Settings, clock: Clock) -> Steps:
        client = redis_client(settings)
        ledger = ledger_for(client, settings, clock)
        models = ModelLedger(client, grace=settings.worker.sweep_grace, clock=clock)
        limiter = UpstreamLimiter(client, Limits())
        api = UpstreamClient(API, settings.api.key, limiter=limiter, session=requests.Session())
        rng = random.Random(7)
        workflows = WorkflowService(ledger)
        jobs = JobService(settings, ledger, api, requests.Session(), clock, rng, workflows)
        training = TrainingService(settings, models, api, jobs, clock, rng)
        sweeper = Sweeper(ledger, models, jobs, clock)
        callbacks = CallbackService(settings, ledger, requests.Session(), clock, rng)
        return cls(
            settings,
            clock,
            client,
            ledger,
            models,
            limiter,
            api,
            workflows,
            jobs,
            training,
            sweeper,
            callbacks,
        )

    def with_settings(self, **groups: dict[str, Any]) -> Steps:
        """The same graph under settings with some fields of some groups changed."""
        update = {name: getattr(self.settings, name).model_copy(update=f) for name, f in groups.items()}
        settings = self.settings.model_copy(update=update)
        for service in (self.jobs, self.training, self.callbacks):
            service.settings = settings
        self.settings = settings
        return self

    # ------------------------------------------------------------------ reading the ledger

    def job(self, job_id: str) -> JobRecord:
        record = self.ledger.get(job_id)
        assert record is not None, f"no job {job_id}"
        return record

    def model(self, model_id: str = "m1") -> ModelRecord:
        record = self.models.get(model_id)
        assert record is not None, f"no model {model_id}"
        return record

    def due(self, job_id: str) -> float | None:
        return self.redis.zscore(keys.DUE, job_id)

    def model_due(self, model_id: str = "m1") -> float | None:
        return self.redis.zscore(keys.MODELS_DUE, model_id)

    def callback_due(self, job_id: str) -> float | None:
        return self.redis.zscore(keys.CALLBACKS_DUE, job_id)

    # ------------------------------------------------------------------ writing the ledger

    def image(
        self,
        job_id: str,
        *,
        outputs: int = 1,
        model_id: str | None = None,
        callback: dict[str, Any] | None = None,
    ) -> JobState:
        """Record an image job as the producer does; returns its first state (pending or parked)."""
        created = self.ledger.create(
            job_id,
            JobKind.IMAGE,
            {"prompt": f"prompt of {job_id}"},
            expected_outputs=outputs,
            model_id=model_id,
            callback=callback,
        )
        assert created.created and created.state is not None
        return created.state

    def block_upstream(self, seconds: float) -> None:
        """Close the shared limiter (as a 429 does): the next call is Throttled, nothing is sent."""
        self.limiter.block(seconds)

    def unblock_upstream(self) -> None:
        self.redis.delete(keys.LIMIT_BLOCKED)


@pytest.fixture(scope="module", name="shared_redis")
def shared_redis_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(name="steps")
def steps_fixture(shared_redis: EmbeddedRedis, tmp_path: Path) -> Iterator[Steps]:
    client = shared_redis.client()
    client.flushall()
    client.close()
    env = {**BASE_ENV, "GENQ_REDIS_URL": shared_redis.url, "GENQ_DOWNLOAD_DIR": str(tmp_path / "dl")}
    with environment(env):
        settings = load_settings()
    graph = Steps.build(settings, Clock())
    try:
        yield graph
    finally:
        graph.api.session.close()
        graph.jobs.files.close()
        graph.callbacks.session.close()
        graph.redis.close()


@pytest.fixture(name="upstream")
def upstream_fixture() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def model_status(upstream: responses.RequestsMock, status: str, model_id: str = "m1", **extra: Any) -> Any:
    """``GET /models/{id}`` answers this status (replacing any earlier answer)."""
    url = f"{API}/models/{model_id}"
    body = {"result": {"modelId": model_id, "status": status, **extra}}
    upstream.remove(responses.GET, url)
    return upstream.get(url, json=body)


def train_answer(upstream: responses.RequestsMock, model_id: str = "m1", **kwargs: Any) -> Any:
    """``GET /models/{id}/train`` answers this (default: the success string)."""
    url = f"{API}/models/{model_id}/train"
    upstream.remove(responses.GET, url)
    if not kwargs:
        kwargs = {"body": "Training started"}
    return upstream.get(url, **kwargs)


def calls_to(upstream: responses.RequestsMock, path: str) -> int:
    return sum(1 for call in upstream.calls if call.request.url == API + path)
