"""Log lines of genqueue processes: Celery's human-readable lines by default, one JSON object per line
with ``GENQ_LOG_FORMAT=json``.

Each line carries the task and the job (or model) it was logged under. The worker binds them when a
task starts (:func:`bind`, from a ``task_prerun`` signal) in a context variable, so every logger
(genqueue's, Celery's, requests') gets them without being passed anything; outside a task they are
null. Plain Python: no Celery here.
"""

from __future__ import annotations

import ast
import json
import logging
import sys
from collections.abc import Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from genq.celeryconf import MODEL_TASKS

"""Tasks whose first argument is a model id; every other genqueue task but the sweep names a job."""

LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class TaskContext:
    """What a log line was emitted under."""

    task: str
    task_id: str
    job_id: str | None = None
    model_id: str | None = None


_current: ContextVar[TaskContext | None] = ContextVar("genq_task_context", default=None)


def subject(task: str, args: Sequence[Any]) -> tuple[str | None, str | None]:
    """``(job id, model id)`` a genqueue task is about, from its arguments (ids and plain values).

    >>> subject("genq.poll", ["3f2c", 2])
    ('3f2c', None)
    """
    if not task.startswith("genq.") or not args:
        return None, None
    if task in MODEL_TASKS:
        return None, str(args[0])
    if task == "genq.intake":
        # (request, request_id): the job id is derived from the request id, never the payload.
        if len(args) < 2 or not isinstance(args[1], str):
            return None, None
        from genq.intake import job_id_for

        return job_id_for(args[1]), None
    return (str(args[0]), None) if isinstance(args[0], str) else (None, None)


def bind(task: str, task_id: str, args: Sequence[Any]) -> Token[TaskContext | None]:
    """Log lines from here on (in this thread or task) carry this task and its job."""
    job_id, model_id = subject(task, args)
    return _current.set(TaskContext(task, task_id, job_id, model_id))


def unbind(token: Token[TaskContext | None]) -> None:
    _current.reset(token)


def current() -> TaskContext | None:
    return _current.get()


class ContextFilter(logging.Filter):
    """Puts the bound task context on every record passing a handler (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get() or _celery_context(record)
        record.genq_task = ctx.task if ctx else None
        record.genq_task_id = ctx.task_id if ctx else None
        record.genq_job_id = ctx.job_id if ctx else None
        record.genq_model_id = ctx.model_id if ctx else None
        return True


def _celery_context(record: logging.LogRecord) -> TaskContext | None:
    """Celery's lines about a task outside its run (``Task ... received``, in the worker's main process)
    carry the task in ``record.data``, its arguments as their repr."""
    data = getattr(record, "data", None)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "id" not in data:
        return None
    try:
        args = ast.literal_eval(data.get("args") or "()")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        args = ()
    job_id, model_id = subject(data["name"], args if isinstance(args, (list, tuple)) else ())
    return TaskContext(data["name"], str(data["id"]), job_id, model_id)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, process, message, task, task id,
    job id, model id, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
            "task": getattr(record, "genq_task", None),
            "task_id": getattr(record, "genq_task_id", None),
            "job_id": getattr(record, "genq_job_id", None),
            "model_id": getattr(record, "genq_model_id", None),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(logger: logging.Logger, fmt: LogFormat) -> None:
    """Give ``logger``'s handlers the task context and, for ``json``, the JSON formatter. The
    ``text`` format keeps each handler's formatter (Celery's, in a worker)."""
    for handler in logger.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        if fmt == "json":
            handler.setFormatter(JsonFormatter())


def setup(fmt: LogFormat, level: int = logging.INFO) -> None:
    """Logging for a genqueue process that Celery does not set up (Flower, the exporter): stderr."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(name)s] %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    configure(root, fmt)
