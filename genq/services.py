"""The per-process service graph: one Redis pool, one HTTP session per host role, built from settings."""

from __future__ import annotations

import random
from dataclasses import dataclass

import redis

from genq import keys, metrics
from genq.actions import Action
from genq.api import UpstreamClient
from genq.callbacks import CallbackService, callback_policy
from genq.clock import Clock
from genq.jobs import JobService, net_policy
from genq.limits import Limits, UpstreamLimiter
from genq.model_store import ModelLedger
from genq.netguard import guarded_session
from genq.settings import Settings
from genq.store import Ledger
from genq.sweeper import Sweeper
from genq.training import TrainingService
from genq.workflows import WorkflowService


def redis_client(settings: Settings) -> redis.Redis:
    """A client with its own connection pool; timeouts so a dead Redis fails fast instead of hanging."""
    return redis.Redis.from_url(
        settings.redis.url,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=True,
    )


def ledger_for(client: redis.Redis, settings: Settings, clock: Clock | None = None) -> Ledger:
    """The ledger; its clock (Redis's, see :mod:`genq.clock`) is the one every service of the process uses."""
    return Ledger(client, job_ttl=settings.worker.job_ttl, grace=settings.worker.sweep_grace, clock=clock)


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    ledger: Ledger
    api: UpstreamClient
    jobs: JobService
    training: TrainingService
    sweeper: Sweeper
    callbacks: CallbackService

    @classmethod
    def build(cls, settings: Settings) -> Services:
        client = redis_client(settings)
        ledger = ledger_for(client, settings)
        limits = settings.limits
        limiter = UpstreamLimiter(
            client,
            Limits(
                rates={
                    "trigger": limits.trigger_rate,
                    "status": limits.status_rate,
                    "models": limits.models_rate,
                },
                total_rate=limits.rate,
                max_concurrent=limits.max_concurrent,
                lease_seconds=settings.api.connect_timeout + settings.api.read_timeout + 5,
            ),
        )
        api = UpstreamClient(
            settings.api.base_url,
            settings.api.key,
            connect_timeout=settings.api.connect_timeout,
            read_timeout=settings.api.read_timeout,
            limiter=limiter,
        )
        recorder = metrics.Recorder(client)
        metrics.instrument(api, recorder)
        # A separate session for output files: the API key must never be sent to a file host, and
        # every connection it makes is checked against the SSRF policy on the address it connects to.
        files = guarded_session(net_policy(settings))
        rng = random.Random()
        clock = ledger.clock
        jobs = JobService(settings, ledger, api, files, clock, rng, WorkflowService(ledger), recorder)
        models = ModelLedger(client, grace=settings.worker.sweep_grace, clock=clock)
        training = TrainingService(settings, models, api, jobs, clock, rng)
        sweeper = Sweeper(ledger, models, jobs, clock)
        receivers = guarded_session(callback_policy(settings))
        callbacks = CallbackService(settings, ledger, receivers, clock, rng)
        return cls(settings, client, ledger, api, jobs, training, sweeper, callbacks)

    def deliveries(self, task_id: str) -> int:
        """Count one more delivery of a task message; returns the count so far."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(keys.deliveries(task_id))
        pipe.expire(keys.deliveries(task_id), 86400)
        count, _ = pipe.execute()
        return int(count)

    def poison(self, task_name: str, subject: str, deliveries: int) -> list[Action]:
        """End the job (or model training) a poison message is about, with the reason."""
        reason = f"{task_name} was delivered {deliveries} times without finishing (it may crash its worker)"
        if task_name in ("genq.train", "genq.poll_model"):
            return self.training.abandon(subject, reason)
        return self.jobs.abandon(subject, reason)

    def close(self) -> None:
        self.api.session.close()
        self.jobs.files.close()
        self.callbacks.session.close()
        self.redis.close()
