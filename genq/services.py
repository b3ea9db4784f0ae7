"""The per-process service graph: one Redis pool, one HTTP session per host role, built from settings."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Final

import redis
from redis.sentinel import Sentinel

from genq import metrics
from genq.api import UpstreamClient
from genq.backlog import QueueBacklog
from genq.callbacks import CallbackService, callback_policy
from genq.celeryconf import POLL, SUBMIT
from genq.clock import Clock
from genq.intake import TurnQueue
from genq.jobs import JobService, net_policy
from genq.ledger import Ledger
from genq.limits import Limits, UpstreamLimiter
from genq.model_ledger import ModelLedger
from genq.netguard import guarded_session
from genq.settings import RedisSettings, Settings
from genq.sweeper import Sweeper
from genq.training import TrainingService
from genq.workflows import WorkflowService

_TIMEOUTS: Final = {
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "health_check_interval": 30,
    "retry_on_timeout": True,
}
"""So that a dead Redis fails fast instead of hanging."""


def redis_client(settings: Settings) -> redis.Redis:
    """The ledger's client, with its own connection pool: through Sentinel when it is configured."""
    if settings.redis.sentinels:
        return sentinel_primary(settings.redis)
    return redis_for_url(settings.redis.url, settings.redis)


def redis_for_url(url: str, options: RedisSettings) -> redis.Redis:
    """A client for ``url``; a ``rediss://`` one checks the server's certificate per ``options``."""
    tls = options.ssl_options() if url.startswith("rediss://") else {}
    return redis.Redis.from_url(url, **_TIMEOUTS, **tls)


def broker_redis_client(settings: Settings) -> redis.Redis | None:
    """A client for the broker's Redis, or None when the broker is not Redis (RabbitMQ)."""
    broker_url = settings.redis.broker_url
    if broker_url is None:
        return redis_client(settings)
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return redis_for_url(broker_url, settings.redis)
    return None


class _SentinelPrimary(redis.Redis):
    """The Sentinel-managed primary; closing it also closes the connections to the sentinels."""

    sentinel_manager: Sentinel | None = None

    def close(self) -> None:
        super().close()
        if self.sentinel_manager is not None:
            self.sentinel_manager.close()


def sentinel_primary(options: RedisSettings) -> redis.Redis:
    """A client that asks the sentinels where the primary is, and asks again after a connection
    error, so it follows a failover."""
    nodes = [(host, int(port)) for host, _, port in (node.rpartition(":") for node in options.sentinels)]
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs(options))  # type: ignore[no-untyped-call]
    client: _SentinelPrimary = sentinel.master_for(  # type: ignore[no-untyped-call]
        options.sentinel_master,
        redis_class=_SentinelPrimary,
        password=options.sentinel_master_password.get_secret_value() or None,
        db=options.sentinel_db,
        **_TIMEOUTS,
    )
    client.sentinel_manager = sentinel
    return client


def sentinel_kwargs(options: RedisSettings) -> dict[str, Any]:
    """How to connect to the sentinel nodes themselves (not to the primary)."""
    kwargs: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2}
    if options.sentinel_password.get_secret_value():
        kwargs["password"] = options.sentinel_password.get_secret_value()
    return kwargs


def insecure_tls_warning(settings: Settings) -> str | None:
    """The warning every process logs at start when the certificate check is turned off."""
    if not settings.redis.tls_insecure:
        return None
    return (
        "GENQ_REDIS_TLS_INSECURE is on: Redis TLS connections do not check the server's certificate, "
        "so anyone on the network path can read and change every job and message"
    )


def ledger_for(client: redis.Redis, settings: Settings, clock: Clock | None = None) -> Ledger:
    """The ledger; its clock (Redis's, see :mod:`genq.clock`) is the one every service of the process uses."""
    return Ledger(client, job_ttl=settings.worker.job_ttl, grace=settings.worker.sweep_grace, clock=clock)


def limiter_for(client: redis.Redis, settings: Settings) -> UpstreamLimiter:
    """The shared limits on upstream calls (``GENQ_LIMITS_*``), with the lanes' and producers' shares."""
    limits = settings.limits
    return UpstreamLimiter(
        client,
        Limits(
            rates={
                "trigger": limits.trigger_rate,
                "status": limits.status_rate,
                "models": limits.models_rate,
            },
            total_rate=limits.rate,
            max_concurrent=limits.max_concurrent,
            batch_share=settings.budgets.batch_share,
            weights={name: policy.weight for name, policy in settings.budgets.producers.items()},
            other_weight=settings.budgets.others.weight,
            lease_seconds=settings.api.connect_timeout + settings.api.read_timeout + 5,
        ),
    )


def turn_queue(limiter: UpstreamLimiter, settings: Settings) -> TurnQueue | None:
    """Queueing at intake, when a rate applies to submits (else nothing ever waits for a turn)."""
    return TurnQueue(limiter, settings.budgets.fair_shares) if limiter.queues("trigger") else None


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
    turns: TurnQueue | None = None
    """Queues a new submit behind those of its lane already waiting at the rate limit (intake)."""

    @classmethod
    def build(cls, settings: Settings) -> Services:
        client = redis_client(settings)
        ledger = ledger_for(client, settings)
        limiter = limiter_for(client, settings)
        api = UpstreamClient(
            settings.api.base_url,
            settings.api.key,
            connect_timeout=settings.api.connect_timeout,
            read_timeout=settings.api.read_timeout,
            limiter=limiter,
        )
        recorder = metrics.Recorder(client, flush_interval=metrics.FLUSH_SECONDS)
        metrics.instrument(api, recorder)
        # A separate session for output files: the API key must never be sent to a file host, and
        # every connection it makes is checked against the SSRF policy on the address it connects to.
        files = guarded_session(net_policy(settings))
        rng = random.Random()
        clock = ledger.clock
        jobs = JobService(settings, ledger, api, files, clock, rng, WorkflowService(ledger), recorder)
        models = ModelLedger(client, grace=settings.worker.sweep_grace, clock=clock)
        training = TrainingService(settings, models, api, jobs, clock, rng)
        broker = client if settings.redis.broker_url is None else broker_redis_client(settings)
        sweeper = Sweeper(
            ledger,
            models,
            jobs,
            clock,
            QueueBacklog(broker, SUBMIT),
            QueueBacklog(broker, POLL),
            ahead=settings.worker.sweep_ahead,
        )
        receivers = guarded_session(callback_policy(settings))
        callbacks = CallbackService(settings, ledger, receivers, clock, rng)
        turns = turn_queue(limiter, settings)
        return cls(settings, client, ledger, api, jobs, training, sweeper, callbacks, turns)

    def close(self) -> None:
        if self.jobs.recorder is not None:
            self.jobs.recorder.flush()  # the counts summed since the last write
        self.api.session.close()
        self.jobs.files.close()
        self.callbacks.session.close()
        self.redis.close()
