"""The Celery configuration, derived from :class:`genq.settings.Settings`.

Task names and queues live here so that producers (which import no task code) and workers agree.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from kombu import Queue  # type: ignore[attr-defined]

from genq.settings import RedisSettings, Settings

SUBMIT, POLL, DOWNLOAD, TRAINING = "submit", "poll", "download", "training"
QUEUES = (SUBMIT, POLL, DOWNLOAD, TRAINING)


class Task(StrEnum):
    """Every genqueue task by its explicit name: the one spelling of each, for senders and workers."""

    INTAKE = "genq.intake"  # a request by name, from producers in other languages
    SUBMIT = "genq.submit"
    POLL = "genq.poll"
    DOWNLOAD = "genq.download"
    FINALIZE = "genq.finalize"
    TRAIN = "genq.train"
    POLL_MODEL = "genq.poll_model"
    CALLBACK = "genq.callback"
    SWEEP = "genq.sweep"
    ADMIT = "genq.admit"  # the rate limit's admission tick: grants queued submits their turns


MODEL_TASKS = frozenset({Task.TRAIN, Task.POLL_MODEL})
"""Tasks whose first argument is a model id (the others': a job id)."""

TASK_QUEUES: dict[str, str] = {
    Task.SUBMIT: SUBMIT,
    Task.POLL: POLL,
    Task.DOWNLOAD: DOWNLOAD,
    Task.FINALIZE: POLL,
    Task.INTAKE: SUBMIT,
    Task.TRAIN: TRAINING,
    Task.POLL_MODEL: TRAINING,
    Task.SWEEP: POLL,
    Task.ADMIT: SUBMIT,
    Task.CALLBACK: DOWNLOAD,
}
"""Every genqueue task by its explicit name, and the queue it runs on."""

BATCH_PRIORITY = 9
"""Message priority of the batch lane. On the Redis broker kombu keeps each priority in a list of its
own and a worker's BRPOP names every interactive list (priority 0, the default) before any batch one,
across all the queues it consumes: an interactive message is taken ahead of any batch backlog, and a
message sent without a priority (an older producer, the sweep) counts as interactive."""


TURN_PRIORITY = 3
"""Message priority of a batch submit sent at the turn the rate limit granted it: after interactive
work, ahead of the batch backlog (its place in the rate window is taken and runs out)."""


def lane_priority(batch: bool, turn: bool = False) -> int | None:
    """The ``priority`` to send a job's message with: ``None`` (the default, interactive), batch, or a
    batch submit at its granted ``turn``."""
    if not batch:
        return None
    return TURN_PRIORITY if turn else BATCH_PRIORITY


SWEEP_EXPIRES = 900.0
"""Seconds after which a sweep message nobody took is dropped."""


def redis_connection(redis: RedisSettings, transport: dict[str, Any]) -> dict[str, Any]:
    """Broker and result backend URLs, TLS and transport options, from the Redis settings: the one
    place that turns genqueue's (redis-py's) way of naming a Redis into Celery's and kombu's."""
    if redis.sentinels:
        return _sentinel_connection(redis, transport)
    conf: dict[str, Any] = {
        "broker_url": _celery_url(redis.broker),
        "result_backend": _celery_url(redis.url),
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
    }
    # Without these, kombu connects to a rediss:// broker with CERT_NONE (no check at all) and Celery
    # refuses a rediss:// result backend.
    if redis.broker.startswith("rediss://"):
        conf["broker_use_ssl"] = redis.ssl_options()
    if redis.url.startswith("rediss://"):
        conf["redis_backend_use_ssl"] = redis.ssl_options()
    return conf


def _sentinel_connection(redis: RedisSettings, transport: dict[str, Any]) -> dict[str, Any]:
    sentinel = {**transport, "master_name": redis.sentinel_master}
    if redis.sentinel_password.get_secret_value():
        sentinel["sentinel_kwargs"] = {"password": redis.sentinel_password.get_secret_value()}
    urls = _sentinel_url(redis)
    return {
        "broker_url": redis.broker_url or urls,
        "result_backend": urls,
        "broker_transport_options": transport if redis.broker_url else sentinel,
        "result_backend_transport_options": sentinel,
    }


def _celery_url(url: str) -> str:
    """redis-py's ``unix:///path?db=N`` as kombu and Celery spell it: ``redis+socket:///path?virtual_host=N``."""
    if not url.startswith("unix://"):
        return url
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    db = query.get("db", ["0"])[0]
    # redis-py also takes the password as a query option; kombu only in the URL's userinfo.
    netloc = f":{quote(query['password'][0], safe='')}@" if "password" in query else parts.netloc
    return f"redis+socket://{netloc}{parts.path}?virtual_host={db}"


def _sentinel_url(redis: RedisSettings) -> str:
    """One ``sentinel://`` URL per node, ``;``-separated; the password in it is the primary's."""
    password = redis.sentinel_master_password.get_secret_value()
    auth = f":{quote(password, safe='')}@" if password else ""
    return ";".join(f"sentinel://{auth}{node}/{redis.sentinel_db}" for node in redis.sentinels)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for workers and producers alike."""
    worker = settings.worker
    # One visibility timeout everywhere: a held countdown or a running task older than this is
    # delivered again, so Settings checks it exceeds the longest wait plus the longest task.
    transport: dict[str, Any] = {"visibility_timeout": worker.visibility_timeout}
    api_call = int(settings.api.connect_timeout + settings.api.read_timeout) + 30
    return {
        **redis_connection(settings.redis, transport),
        "visibility_timeout": worker.visibility_timeout,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # The ledger is the result of a job; Celery results would only cost a write per task.
        "task_ignore_result": True,
        "result_expires": worker.job_ttl,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_eta_task_limit": worker.eta_task_limit,
        "worker_soft_shutdown_timeout": worker.soft_shutdown_timeout,
        "worker_enable_soft_shutdown_on_idle": True,
        "task_time_limit": worker.task_time_limit,
        "task_soft_time_limit": max(1, worker.task_time_limit - 30),
        "task_annotations": {
            Task.SUBMIT: {"time_limit": api_call + 10, "soft_time_limit": api_call},
            Task.POLL: {"time_limit": api_call + 10, "soft_time_limit": api_call},
            Task.FINALIZE: {"time_limit": 60, "soft_time_limit": 50},
            Task.SWEEP: {"time_limit": 120, "soft_time_limit": 110},
            Task.CALLBACK: {
                "time_limit": 2 * int(settings.callbacks.timeout) + 30,
                "soft_time_limit": 2 * int(settings.callbacks.timeout) + 20,
            },
        },
        "task_queues": [Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        "task_default_queue": POLL,
        "task_routes": {name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": True,
        "worker_redirect_stdouts": False,
        "broker_connection_max_retries": None,
        # The sweeper: run by `celery -A genq.worker beat`. A sweep runs however late it comes, since a
        # backlog on its queue is just when held waits and lost messages need it; sweeps that come
        # together cost one Redis round trip each but the first (see Sweeper.sweep). Only a sweep
        # older than SWEEP_EXPIRES is dropped, so a queue nobody consumes does not grow for ever.
        "beat_schedule": {
            "genq-sweep": {
                "task": Task.SWEEP,
                "schedule": worker.sweep_interval,
                "options": {"queue": POLL, "expires": max(SWEEP_EXPIRES, worker.sweep_interval * 10)},
            }
        },
        "beat_max_loop_interval": min(5.0, worker.sweep_interval),
    }
