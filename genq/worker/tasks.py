"""The job pipeline tasks: submit -> poll (re-enqueued with countdowns) -> downloads -> finalize,
the by-name intake for producers in other languages, and model training."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from genq import intake as intake_service
from genq.actions import (
    Action,
    Admit,
    Download,
    Finalize,
    Notify,
    PollLater,
    PollModelLater,
    SubmitLater,
    TrainLater,
)
from genq.celeryconf import Task, lane_priority
from genq.worker.celery_app import app
from genq.worker.runtime import services


@app.task(name=Task.INTAKE)
def intake(request: dict[str, Any], request_id: str) -> None:
    s = services()
    accepted = intake_service.intake(s.ledger, request, request_id, s.settings, s.turns)
    in_batch = s.ledger.batch_lane(accepted.to_submit)
    actions: list[Action] = [SubmitLater(j, 0.0, batch=j in in_batch) for j in accepted.to_submit]
    dispatch(actions + ([Admit("trigger", accepted.tick)] if accepted.tick else []))


@app.task(name=Task.SUBMIT)
def submit(job_id: str, gen: int = 0) -> None:
    dispatch(services().jobs.submit(job_id, gen))


@app.task(name=Task.POLL)
def poll(job_id: str, gen: int) -> None:
    dispatch(services().jobs.poll(job_id, gen))


@app.task(name=Task.DOWNLOAD)
def download(job_id: str, index: int, attempt: int = 0) -> None:
    dispatch(services().jobs.download(job_id, index, attempt))


@app.task(name=Task.FINALIZE)
def finalize(job_id: str) -> None:
    dispatch(services().jobs.finalize(job_id))


@app.task(name=Task.TRAIN)
def train(model_id: str, gen: int = 0) -> None:
    dispatch(services().training.train(model_id, gen))


@app.task(name=Task.POLL_MODEL)
def poll_model(model_id: str, gen: int) -> None:
    dispatch(services().training.poll(model_id, gen))


@app.task(name=Task.CALLBACK)
def callback(job_id: str) -> None:
    dispatch(services().callbacks.deliver(job_id, send_by_name))


def send_by_name(name: str, args: list[Any], queue: str) -> None:
    """A producer's own task, by name: genqueue never imports the producer's code."""
    app.send_task(name, args=args, queue=queue)


@app.task(name=Task.ADMIT)
def admit(family: str, token: str) -> None:
    dispatch(services().jobs.admit(family, token))


@app.task(name=Task.SWEEP)
def sweep() -> None:
    started = time.monotonic()
    actions, _ = services().sweeper.sweep(min_gap=services().settings.worker.sweep_interval / 2)
    dispatch(actions, since=started)


def dispatch(actions: Iterable[Action], since: float | None = None) -> None:
    """Send the next steps. Countdowns, never sleeps: no slot is held while the upstream works.

    ``since``: the ``time.monotonic()`` reading the actions' delays count from; each message is sent
    with what is left of its delay, so sending many (a sweep's) does not make the last ones late."""

    def left(delay: float) -> float | None:
        if since is not None and delay > 0:
            delay = max(0.0, delay - (time.monotonic() - since))
        return delay or None

    for action in actions:
        match action:
            case SubmitLater(job_id, delay, gen, batch, turn):
                submit.apply_async((job_id, gen), countdown=left(delay), priority=lane_priority(batch, turn))
            case PollLater(job_id, gen, delay, batch):
                poll.apply_async((job_id, gen), countdown=left(delay), priority=lane_priority(batch))
            case Download(job_id, index, attempt, delay, batch):
                download.apply_async(
                    (job_id, index, attempt), countdown=left(delay), priority=lane_priority(batch)
                )
            case Finalize(job_id):
                finalize.apply_async((job_id,))
            case TrainLater(model_id, delay, gen):
                train.apply_async((model_id, gen), countdown=left(delay))
            case PollModelLater(model_id, gen, delay):
                poll_model.apply_async((model_id, gen), countdown=left(delay))
            case Notify(job_id, delay):
                callback.apply_async((job_id,), countdown=left(delay))
            case Admit(family, token, delay):
                admit.apply_async((family, token), countdown=left(delay))
