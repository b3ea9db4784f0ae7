"""Poll schedules as pure functions, a replay that scores them on known durations, and a PROTOTYPE of
an adaptive policy that learns each kind's recent duration distribution (for the lead to move into
``genq/polling.py``; nothing here is used by genqueue).

A schedule is the list of times (seconds after submission) at which a job is checked. For a job whose
upstream work takes ``d`` seconds, the checks made are those up to and including the first at or after
``d``; the detection latency is that check's time minus ``d``.

The adaptive policy, per kind:

- keep the last ``window`` observed durations (submission -> the check that saw success, minus half
  of the interval before that check, an unbiased estimate of when it really finished);
- first check at the ``first_quantile`` (5 %) of those durations: almost nothing finishes earlier,
  so earlier checks are wasted;
- then every ``interval`` seconds (the latency the operator accepts, e.g. 5 s) until the
  ``tail_quantile`` (95 %) of the durations;
- past it (the slow tail, at most 5 % of jobs) the interval grows by ``tail_backoff`` per check up to
  ``max_interval``;
- until ``min_samples`` durations are known, it is the kind's static policy.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from benchmarks.stats import percentile

Schedule = Callable[[], Iterable[float]]


def fixed_schedule(interval: float, first: float | None = None, until: float = 7200.0) -> list[float]:
    """``first``, then every ``interval``: the reference client's fixed polling."""
    out, t = [], interval if first is None else first
    while t <= until:
        out.append(t)
        t += interval
    return out


def backoff_schedule(
    first_delay: float,
    interval: float,
    backoff: float,
    max_interval: float,
    until: float = 7200.0,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> list[float]:
    """genqueue's ``poll_delay`` arithmetic: first_delay, then interval x backoff^n capped (± jitter)."""
    rng = rng or random.Random(0)
    out: list[float] = []
    t = first_delay * (1 + rng.uniform(-jitter, jitter))
    step = interval
    while t <= until:
        out.append(t)
        t += min(step, max_interval) * (1 + rng.uniform(-jitter, jitter))
        step *= backoff
    return out


def outcome(schedule: Sequence[float], duration: float) -> tuple[int, float]:
    """(checks made, detection latency) of one job under ``schedule``."""
    for i, t in enumerate(schedule):
        if t >= duration:
            return i + 1, t - duration
    raise ValueError(f"schedule ends at {schedule[-1] if schedule else 0}s, before the job ({duration}s)")


@dataclass
class AdaptivePolicy:
    """The prototype. ``observe`` each finished job; ``schedule`` for the next one."""

    interval: float = 5.0
    first_quantile: float = 5.0
    tail_quantile: float = 95.0
    tail_backoff: float = 1.5
    max_interval: float = 60.0
    window: int = 200
    min_samples: int = 20
    fallback: list[float] = field(default_factory=list)
    _seen: deque[float] = field(default_factory=lambda: deque(maxlen=200))

    def __post_init__(self) -> None:
        self._seen = deque(maxlen=self.window)

    def observe(self, duration: float) -> None:
        self._seen.append(duration)

    def schedule(self, until: float = 7200.0) -> list[float]:
        if len(self._seen) < self.min_samples:
            return self.fallback
        first = percentile(self._seen, self.first_quantile) or self.interval
        tail = percentile(self._seen, self.tail_quantile) or first
        out, t, step = [], max(first, 0.05), self.interval
        while t <= until:
            out.append(t)
            if t >= tail:
                step = min(self.max_interval, step * self.tail_backoff)
            t += step
        return out

    def next_delay(self, elapsed: float, polls_done: int) -> float:
        """The same policy as genqueue would call it: seconds until the next check of a job that has been
        running ``elapsed`` seconds and was checked ``polls_done`` times."""
        for t in self.schedule():
            if t > elapsed + 1e-9:
                return t - elapsed
        return self.max_interval


def replay(
    durations: Sequence[float], schedule_for: Callable[[int], Sequence[float]]
) -> tuple[list[int], list[float]]:
    """Checks and detection latencies of each job; ``schedule_for(i)`` gives job i's schedule."""
    gets, late = [], []
    for i, d in enumerate(durations):
        n, lat = outcome(schedule_for(i), d)
        gets.append(n)
        late.append(lat)
    return gets, late


def replay_adaptive(durations: Sequence[float], policy: AdaptivePolicy) -> tuple[list[int], list[float]]:
    """Jobs in submission order; each finished job's duration (estimated as the policy would, from its
    detecting check minus half the preceding interval) is observed before the next job is scheduled."""
    gets, late = [], []
    for d in durations:
        schedule = policy.schedule()
        n, lat = outcome(schedule, d)
        gets.append(n)
        late.append(lat)
        seen = schedule[n - 1]
        before = schedule[n - 2] if n >= 2 else 0.0
        policy.observe(seen - (seen - before) / 2)
    return gets, late
