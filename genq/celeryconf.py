"""The Celery configuration, derived from :class:`genq.settings.Settings`.

Task names and queues live here so that producers (which import no task code) and workers agree.
"""

from __future__ import annotations

from typing import Any

from kombu import Queue  # type: ignore[attr-defined]

from genq.settings import Settings

SUBMIT, POLL, DOWNLOAD, TRAINING = "submit", "poll", "download", "training"
QUEUES = (SUBMIT, POLL, DOWNLOAD, TRAINING)

TASK_QUEUES: dict[str, str] = {
    "genq.submit": SUBMIT,
    "genq.poll": POLL,
    "genq.download": DOWNLOAD,
    "genq.finalize": POLL,
    "genq.intake": SUBMIT,
    "genq.train": TRAINING,
    "genq.poll_model": TRAINING,
    "genq.sweep": POLL,
    "genq.callback": DOWNLOAD,
}
"""Every genqueue task by its explicit name, and the queue it runs on."""

SWEEP_EXPIRES = 900.0
"""Seconds after which a sweep message nobody took is dropped."""


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for workers and producers alike."""
    worker = settings.worker
    # One visibility timeout everywhere: a held countdown or a running task older than this is
    # delivered again, so Settings checks it exceeds the longest wait plus the longest task.
    transport = {"visibility_timeout": worker.visibility_timeout}
    api_call = int(settings.api.connect_timeout + settings.api.read_timeout) + 30
    return {
        "broker_url": settings.redis.broker,
        "result_backend": settings.redis.url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
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
            "genq.submit": {"time_limit": api_call + 10, "soft_time_limit": api_call},
            "genq.poll": {"time_limit": api_call + 10, "soft_time_limit": api_call},
            "genq.finalize": {"time_limit": 60, "soft_time_limit": 50},
            "genq.sweep": {"time_limit": 120, "soft_time_limit": 110},
            "genq.callback": {
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
                "task": "genq.sweep",
                "schedule": worker.sweep_interval,
                "options": {"queue": POLL, "expires": max(SWEEP_EXPIRES, worker.sweep_interval * 10)},
            }
        },
        "beat_max_loop_interval": min(5.0, worker.sweep_interval),
    }
