"""The per-process service graph: one Redis pool, one HTTP session per host role, built from settings."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import redis
import requests

from config.settings import Settings
from genq.api import UpstreamClient
from genq.jobs import JobService
from genq.model_store import ModelLedger
from genq.store import Ledger
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


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    ledger: Ledger
    api: UpstreamClient
    jobs: JobService
    training: TrainingService

    @classmethod
    def build(cls, settings: Settings) -> Services:
        client = redis_client(settings)
        ledger = Ledger(client, job_ttl=settings.worker.job_ttl)
        api = UpstreamClient(
            settings.api.base_url,
            settings.api.key,
            connect_timeout=settings.api.connect_timeout,
            read_timeout=settings.api.read_timeout,
        )
        # A separate session for output files: the API key must never be sent to a file host.
        files = requests.Session()
        rng = random.Random()
        jobs = JobService(settings, ledger, api, files, time.time, rng, WorkflowService(ledger))
        training = TrainingService(settings, ModelLedger(client), api, jobs, time.time, rng)
        return cls(settings, client, ledger, api, jobs, training)

    def close(self) -> None:
        self.api.session.close()
        self.jobs.files.close()
        self.redis.close()
