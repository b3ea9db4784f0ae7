"""The job pipeline tasks: submit -> poll (re-enqueued with countdowns) -> downloads -> finalize."""

from __future__ import annotations

from collections.abc import Iterable

from genq.actions import Action, Download, Finalize, PollLater, SubmitLater
from workers.celery_app import app
from workers.runtime import services


@app.task(name="genq.submit")
def submit(job_id: str) -> None:
    dispatch(services().jobs.submit(job_id))


@app.task(name="genq.poll")
def poll(job_id: str, gen: int) -> None:
    dispatch(services().jobs.poll(job_id, gen))


@app.task(name="genq.download")
def download(job_id: str, index: int, attempt: int = 0) -> None:
    dispatch(services().jobs.download(job_id, index, attempt))


@app.task(name="genq.finalize")
def finalize(job_id: str) -> None:
    dispatch(services().jobs.finalize(job_id))


def dispatch(actions: Iterable[Action]) -> None:
    """Send the next steps. Countdowns, never sleeps: no slot is held while the upstream works."""
    for action in actions:
        match action:
            case SubmitLater(job_id, delay):
                submit.apply_async((job_id,), countdown=delay)
            case PollLater(job_id, gen, delay):
                poll.apply_async((job_id, gen), countdown=delay)
            case Download(job_id, index, attempt, delay):
                download.apply_async((job_id, index, attempt), countdown=delay or None)
            case Finalize(job_id):
                finalize.apply_async((job_id,))
