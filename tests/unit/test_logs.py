"""``genq.logs``: the task context every line carries, the JSON format, and what a task is about."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from genq import logs
from genq.intake import job_id_for


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    log = logging.getLogger("genq.test.logs")
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log, out
    log.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("task", "args", "expected"),
    [
        ("genq.submit", ["j1"], ("j1", None)),
        ("genq.poll", ("j1", 3), ("j1", None)),
        ("genq.download", ["j1", 0, 2], ("j1", None)),
        ("genq.train", ["my-style"], (None, "my-style")),
        ("genq.poll_model", ["my-style", 2], (None, "my-style")),
        ("genq.intake", [{"kind": "image", "prompt": "secret"}, "order-1"], (job_id_for("order-1"), None)),
        ("genq.intake", [{"kind": "image"}], (None, None)),
        ("genq.sweep", [], (None, None)),
        ("other.task", ["j1"], (None, None)),
        ("genq.poll", [7, 3], (None, None)),
    ],
)
def test_subject(task: str, args: list[object], expected: tuple[str | None, str | None]) -> None:
    assert logs.subject(task, args) == expected


def test_json_lines_carry_the_bound_task_and_job(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    logs.configure(log, "json")
    log.info("outside %s", "any task")
    token = logs.bind("genq.poll", "task-1", ["job-1", 4])
    try:
        log.warning("polling %s", "job-1")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it broke")
    finally:
        logs.unbind(token)
    log.info("after")

    first, inside, broke, after = lines(out)
    assert first["message"] == "outside any task"
    assert (first["task"], first["task_id"], first["job_id"]) == (None, None, None)
    assert (inside["task"], inside["task_id"], inside["job_id"], inside["model_id"]) == (
        "genq.poll",
        "task-1",
        "job-1",
        None,
    )
    assert inside["level"] == "WARNING" and inside["logger"] == "genq.test.logs"
    assert inside["ts"].endswith("+00:00")  # type: ignore[union-attr]
    assert "RuntimeError: boom" in broke["exc"]  # type: ignore[operator]
    assert after["task"] is None


def test_celery_received_lines_get_their_task_from_the_record(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    logs.configure(log, "json")
    data = {"id": "t-9", "name": "genq.download", "args": "('job-9', 1, 0)", "kwargs": "{}", "eta": None}
    log.info("Task %(name)s[%(id)s] received", data, extra={"data": data})
    (line,) = lines(out)
    assert line["message"] == "Task genq.download[t-9] received"
    assert (line["task"], line["task_id"], line["job_id"]) == ("genq.download", "t-9", "job-9")


def test_context_is_per_thread(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    logs.configure(log, "json")
    token = logs.bind("genq.submit", "main-task", ["job-main"])
    other = threading.Thread(target=lambda: log.info("from another thread"))
    other.start()
    other.join()
    logs.unbind(token)
    (line,) = lines(out)
    assert line["job_id"] is None  # a thread pool's other tasks never borrow this one's job


def test_text_format_keeps_the_formatter_and_configure_is_idempotent(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    logs.configure(log, "text")
    logs.configure(log, "text")
    (handler,) = [h for h in log.handlers if getattr(h, "stream", None) is out]  # pytest adds its own
    assert sum(isinstance(f, logs.ContextFilter) for f in handler.filters) == 1
    log.info("plain line")
    assert out.getvalue() == "plain line\n"
