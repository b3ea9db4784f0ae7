"""The task base class every genqueue task runs under: it counts deliveries, so a message that keeps
killing its worker (late acks deliver it again each time) ends its job ``failed`` instead of looping."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from genq import keys
from genq.actions import Action
from genq.celeryconf import MODEL_TASKS
from genq.services import Services
from genq.worker.runtime import services

log = logging.getLogger("genq.worker")


class GenqTask(Task):  # type: ignore[misc]
    """Subject of a task: its first argument, a job id (or a model id for the training tasks)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task_id = self.request.id
        # kombu marks a message it puts back (after a worker died holding it) as redelivered; only
        # those are counted, so a first delivery, nearly all of them, costs no Redis round trip.
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        if task_id and args and redelivered and not self.request.is_eager:
            deliveries = count_delivery(services(), task_id) + 1  # the first delivery was not counted
            limit = services().settings.worker.max_deliveries
            if deliveries > limit:
                log.error("%s[%s] delivered %d times: poison", self.name, task_id, deliveries)
                from genq.worker.tasks import dispatch

                dispatch(poison(services(), self.name, str(args[0]), deliveries))
                return None
        return super().__call__(*args, **kwargs)


def count_delivery(services: Services, task_id: str) -> int:
    """Count one more delivery of a task message; returns the count so far."""
    pipe = services.redis.pipeline(transaction=False)
    pipe.incr(keys.deliveries(task_id))
    pipe.expire(keys.deliveries(task_id), 86400)
    count, _ = pipe.execute()
    return int(count)


def poison(services: Services, task_name: str, subject: str, deliveries: int) -> list[Action]:
    """End the job (or model training) a poison message is about, with the reason."""
    reason = f"{task_name} was delivered {deliveries} times without finishing (it may crash its worker)"
    if task_name in MODEL_TASKS:
        return services.training.abandon(subject, reason)
    return services.jobs.abandon(subject, reason)
