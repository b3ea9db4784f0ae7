"""Poll schedules, their replay, and the adaptive policy prototype of the benchmarks."""

from __future__ import annotations

import itertools
import random

import pytest

from benchmarks.adaptive import (
    AdaptivePolicy,
    backoff_schedule,
    fixed_schedule,
    outcome,
    replay,
    replay_adaptive,
)
from benchmarks.b4_polling import durations, scaled
from genq.polling import poll_delay
from genq.settings import PollPolicy


def test_fixed_schedule_and_outcome() -> None:
    s = fixed_schedule(5.0, until=30)
    assert s == [5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    assert outcome(s, 8.0) == (2, 2.0)
    assert outcome(s, 10.0) == (2, 0.0)
    assert outcome(s, 0.5) == (1, 4.5)
    with pytest.raises(ValueError):
        outcome(s, 31.0)


def test_backoff_schedule_is_genqueues_poll_delay_arithmetic() -> None:
    policy = PollPolicy(first_delay=2, interval=2, backoff=1.25, max_interval=10, jitter=0, deadline=900)
    expected, t = [], 0.0
    for n in range(12):
        t += poll_delay(policy, n)
        expected.append(t)
    got = backoff_schedule(2, 2, 1.25, 10)[:12]
    assert got == pytest.approx(expected)


def test_replay_counts_checks_and_latency_per_job() -> None:
    gets, late = replay([1.0, 6.0, 12.0], lambda i: fixed_schedule(5.0))
    assert gets == [1, 2, 3]
    assert late == pytest.approx([4.0, 4.0, 3.0])


def test_adaptive_policy_falls_back_until_it_has_samples() -> None:
    policy = AdaptivePolicy(interval=5, min_samples=3, fallback=[1.0, 2.0])
    assert policy.schedule() == [1.0, 2.0]
    for d in (40.0, 50.0, 60.0):
        policy.observe(d)
    s = policy.schedule(until=200)
    assert s[0] == pytest.approx(41.0)  # the 5th percentile of 40, 50, 60
    assert s[1] - s[0] == pytest.approx(5.0)
    assert policy.next_delay(elapsed=0.0, polls_done=0) == pytest.approx(41.0)


def test_adaptive_policy_grows_its_interval_past_the_tail_quantile() -> None:
    policy = AdaptivePolicy(interval=5, min_samples=1, tail_backoff=2.0, max_interval=40)
    for d in range(10, 30):
        policy.observe(float(d))
    s = policy.schedule(until=400)
    steps = [b - a for a, b in itertools.pairwise(s)]
    assert steps[0] == 5
    assert max(steps) == 40  # capped


def test_adaptive_replay_saves_checks_on_long_jobs_without_missing_them() -> None:
    rng = random.Random(3)
    long_jobs = [90 + rng.uniform(-20, 20) for _ in range(300)]
    base_gets, _ = replay(long_jobs, lambda i: fixed_schedule(5.0))
    gets, late = replay_adaptive(long_jobs, AdaptivePolicy(interval=5.0, fallback=fixed_schedule(5.0)))
    assert sum(gets) < 0.8 * sum(base_gets)
    assert sorted(late)[int(0.95 * len(late))] <= 5.0 + 1e-9


def test_poll_benchmark_durations_are_seeded_and_capped() -> None:
    a, b = durations(50, 10), durations(50, 10)
    assert a == b
    assert sum(1 for k, _ in a if k == "video") == 10
    assert all(d <= 60 for k, d in a if k == "image") and all(d <= 240 for k, d in a if k == "video")


def test_scaled_policy_divides_times_only() -> None:
    policy = PollPolicy(first_delay=15, interval=10, backoff=1.25, max_interval=30, jitter=0.1, deadline=3600)
    import json

    got = json.loads(scaled(policy, 10))
    assert got["first_delay"] == 1.5 and got["interval"] == 1.0 and got["max_interval"] == 3.0
    assert got["deadline"] == 360 and got["backoff"] == 1.25 and got["jitter"] == 0.1
