"""Worker signal handlers: per-process services, and a start-up check of the Redis it uses."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from workers import runtime

log = logging.getLogger("genq.worker")


@worker_process_init.connect
def _build_services(**_: Any) -> None:
    runtime.reset()
    runtime.services()


@worker_process_shutdown.connect
def _close_services(**_: Any) -> None:
    runtime.reset()


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
