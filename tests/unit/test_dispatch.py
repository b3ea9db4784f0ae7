"""How the task layer sends a service's next steps: countdowns, counted from when they were decided."""

from __future__ import annotations

import time
from typing import Any

import pytest

from genq.actions import PollLater, SubmitLater
from genq.worker import tasks


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for task in (tasks.poll, tasks.submit):
        monkeypatch.setattr(task, "apply_async", lambda args, **kw: out.append((args[0], kw)))
    return out


def test_a_countdown_is_sent_as_decided(sent: list[tuple[str, dict[str, Any]]]) -> None:
    tasks.dispatch([PollLater("a", 1, 12.5), SubmitLater("b", 0.0)])
    assert [(job, kw["countdown"]) for job, kw in sent] == [("a", 12.5), ("b", None)]


def test_a_sweeps_countdowns_count_from_its_start(sent: list[tuple[str, dict[str, Any]]]) -> None:
    """A sweep decides every delay at its start and sends for a while after: each message gets what
    is left of its delay, so the last ones sent do not run late by the sending before them."""
    started = time.monotonic() - 30.0  # as if claiming and sending had taken 30 s so far
    tasks.dispatch(
        [PollLater("far", 1, 100.0), PollLater("passed", 1, 10.0), SubmitLater("now", 0.0, 2)],
        since=started,
    )
    countdowns = {job: kw["countdown"] for job, kw in sent}
    assert 60.0 <= countdowns["far"] <= 70.0  # 100 s from the start, 30 s (and this test's own) gone
    assert countdowns["passed"] is None  # its time came while the sweep was sending: at once
    assert countdowns["now"] is None
