"""Live progress of jobs in a terminal: one bar per job, driven by the ledger's event stream."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from genq.schemas import JobRecord, JobState

if TYPE_CHECKING:
    from genq.producer import Producer

STAGE = {
    JobState.PARKED: 0,
    JobState.PENDING: 0,
    JobState.SUBMITTING: 1,
    JobState.SUBMITTED: 2,
    JobState.RUNNING: 3,
    JobState.DOWNLOADING: 4,
}
STAGES = 5


class JobBoard:
    """A rich Progress with one bar per job and one for all of them."""

    def __init__(self, console: Console, total: int | None = None) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.progress = Progress(*columns, console=console)
        self.overall = self.progress.add_task("[bold]all jobs", total=total)
        self.bars: dict[str, TaskID] = {}
        self.done: set[str] = set()

    def show(self, record: JobRecord) -> None:
        if record.id not in self.bars:
            self.bars[record.id] = self.progress.add_task("", total=STAGES)
            if self.progress.tasks[self.overall].total is not None and len(self.bars) > self.total:
                self.progress.update(self.overall, total=len(self.bars))
        stage = STAGES if record.terminal else STAGE.get(record.state, 0)
        colour = "green" if record.state is JobState.SUCCEEDED else ("red" if record.terminal else "cyan")
        label = f"{record.id[:8]} {record.kind.value:<8} [{colour}]{record.state.value}[/]"
        self.progress.update(self.bars[record.id], completed=stage, description=label)
        if record.terminal:
            self.done.add(record.id)
        self.progress.update(self.overall, completed=len(self.done))

    @property
    def total(self) -> float:
        return self.progress.tasks[self.overall].total or 0

    def __enter__(self) -> JobBoard:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)


def watch_jobs(
    producer: Producer, job_ids: Iterable[str] | None, *, timeout: float | None, as_json: bool
) -> None:
    """Follow the given jobs (and their workflow steps) until they end, or every job in flight."""
    ids = list(job_ids) if job_ids is not None else None
    if as_json:
        for event in producer.watch(ids, timeout=timeout):
            print(json.dumps(event.__dict__), flush=True)
        return
    start = (
        [producer.status(i) for i in ids]
        if ids
        else producer.list_jobs(state=[s.value for s in JobState if not s.terminal], limit=200)
    )
    with JobBoard(Console(), total=len(start) if ids else None) as board:
        for record in start:
            board.show(record)
        for event in producer.watch(ids, timeout=timeout):
            changed = producer.ledger.get(event.job_id)
            if changed is not None:
                board.show(changed)
