"""The polling benchmark's offline parts: the slowdown plan, the frontier, the replay of genqueue's
adaptive schedule. Pure arithmetic; no services, no timing."""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.adaptive import fixed_schedule, frontier, replay, replay_learned
from benchmarks.b4_polling import SLOWDOWN, durations, phased
from genq.settings import PollSettings


def test_the_middle_half_of_the_run_is_slower() -> None:
    jobs = durations(80, 20)
    plan = phased(jobs, 100.0)
    assert [p for _, _, _, p in plan[:25]] == ["before"] * 25
    assert {p for _, _, _, p in plan[25:75]} == {"slow"}
    assert {p for _, _, _, p in plan[75:]} == {"after"}
    for (kind, d), (_, kind2, d2, phase) in zip(jobs, plan, strict=True):
        assert kind == kind2 and d2 == pytest.approx(d * (SLOWDOWN if phase == "slow" else 1.0))


def test_frontier_of_one_duration_is_one_check() -> None:
    pytest.importorskip("numpy")
    best = frontier([10.0] * 50, p95=1.0)
    assert best.gets_per_job == 1.0 and 9.0 <= best.schedule[0] <= 11.0


def test_frontier_is_never_worse_than_a_loop_at_the_loop_s_p95() -> None:
    pytest.importorskip("numpy")
    rng = random.Random(4)
    ds = [90.0 * math.exp(0.4 * rng.gauss(0, 1)) for _ in range(300)]
    gets, late = replay(ds, lambda i: fixed_schedule(5.0))
    p95 = sorted(late)[int(0.95 * len(late))]
    best = frontier(ds, p95)
    assert best.coverage >= 0.95 and best.p95 <= p95 + 1e-6
    assert best.gets_per_job < sum(gets) / len(gets)


def test_replay_of_genqueue_s_schedule_learns_from_nothing() -> None:
    rng = random.Random(6)
    jobs = [(i * 0.5, "video", 90.0 * math.exp(0.4 * rng.gauss(0, 1))) for i in range(600)]
    out = replay_learned(jobs, PollSettings(), jitter=0.0)
    gap = PollSettings().adaptive_gap
    assert out[0][0] == math.ceil(jobs[0][2] / gap)  # the first job: a fixed gap loop
    late = sorted(lat for _, lat in out[300:])
    assert late[int(0.95 * len(late))] <= gap
    assert sum(n for n, _ in out[300:]) < sum(math.ceil(d / 5.0) for _, _, d in jobs[300:])
