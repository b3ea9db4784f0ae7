"""Worker signal handlers: per-process services, log format and task context, message stamps,
and a start-up check of the Redis it uses."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextvars import ContextVar, Token
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    before_task_publish,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from genq import logs, metrics
from genq.services import insecure_tls_warning
from genq.settings import get_settings
from genq.worker import runtime

log = logging.getLogger("genq.worker")


@worker_process_init.connect
def _build_services(**_: Any) -> None:
    runtime.reset()
    runtime.services()


@worker_process_shutdown.connect
def _close_services(**_: Any) -> None:
    runtime.reset()


@worker_init.connect
def _warn_insecure(**_: Any) -> None:
    insecure = insecure_tls_warning(get_settings())
    if insecure:
        log.warning(insecure)


@worker_ready.connect
def _check_redis(**_: Any) -> None:
    try:
        policy = runtime.services().redis.config_get("maxmemory-policy").get("maxmemory-policy", "")
    except Exception as exc:  # CONFIG may be disabled on managed Redis; not fatal.
        log.info("could not read Redis maxmemory-policy: %s", type(exc).__name__)
        return
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    if policy not in ("noeviction", ""):
        log.warning(
            "Redis maxmemory-policy is %s: it may evict job records and queued messages; use noeviction",
            policy,
        )


# ---------------------------------------------------------------------------- logging


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    logs.configure(logger, get_settings().log.format)


# ---------------------------------------------------------------------------- per task run


_run: ContextVar[Token[logs.TaskContext | None] | None] = ContextVar("genq_task_run", default=None)


@task_prerun.connect
def _task_started(task_id: str, task: Any, args: Sequence[Any] | None = None, **_: Any) -> None:
    _run.set(logs.bind(task.name, task_id, args or ()))


@task_postrun.connect
def _task_ended(**_: Any) -> None:
    context = _run.get()
    if context is not None:
        _run.set(None)
        logs.unbind(context)


# ---------------------------------------------------------------------------- publishing


@before_task_publish.connect
def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    # Celery's messages carry no send time; the exporter reads this to tell how long one has waited.
    # A stamp the sender set itself is kept.
    if headers is not None and metrics.SENT_AT_HEADER not in headers:
        headers.update(metrics.sent_at_header())
