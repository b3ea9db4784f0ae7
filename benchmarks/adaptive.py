"""Poll schedules as pure functions, a replay that scores them on known durations, the offline frontier
(the best schedule for a known set of durations), a replay of genqueue's adaptive schedule
(:mod:`genq.schedule`), and the earlier PROTOTYPE of an adaptive policy (kept for its tests; genqueue's
is :mod:`genq.schedule`).

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

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from benchmarks.stats import percentile
from genq import schedule
from genq.settings import PollSettings

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


# ------------------------------------------------------------------ genqueue's schedule and the frontier


def replay_learned(
    jobs: Sequence[tuple[float, str, float]],
    poll: PollSettings,
    jitter: float = 0.1,
    seed: int = 1,
) -> list[tuple[int, float]]:
    """genqueue's adaptive schedule (:mod:`genq.schedule`) replayed on ``(submitted at, kind, duration)``
    with no system overhead: each job's first check is chosen from what had been learned when it was
    submitted, and its duration is learned when it is detected (censored, as polling sees it). Only
    the kind-level histogram (the benchmark's jobs are all one class per kind). Returns (checks,
    detection latency) per job, in order."""
    rng = random.Random(seed)
    gap = poll.adaptive_gap
    learned: dict[str, schedule.Histogram] = {}
    pending: list[tuple[float, int, str, float, float]] = []  # (detected at, job, kind, lo, hi)
    out: list[tuple[int, float]] = []
    for i, (at, kind, d) in enumerate(jobs):
        while pending and pending[0][0] <= at:
            _, _, k, lo, hi = heapq.heappop(pending)
            learned.setdefault(k, schedule.Histogram(poll.adaptive_half_life)).observe(lo, hi)
        h = learned.get(kind)
        first = schedule.first_poll(
            h.learned() if h else None, gap, poll.adaptive_skip, poll.adaptive_min_samples
        )
        first = max(0.0, first - rng.uniform(0.0, jitter / 2) * gap)
        n = 1 if d <= first else 1 + math.ceil((d - first) / gap)
        seen = first + (n - 1) * gap
        out.append((n, seen - d))
        heapq.heappush(pending, (at + seen, i, kind, 0.0 if n == 1 else seen - gap, seen))
    return out


@dataclass
class Frontier:
    """The fewest checks per job any schedule makes on a known set of durations while detecting at
    least ``coverage`` of them within ``p95`` seconds, and that schedule."""

    gets_per_job: float
    coverage: float
    p95: float
    schedule: list[float]


def frontier(durations: Sequence[float], p95: float, coverage: float = 0.95, step: float = 0.1) -> Frontier:
    """Offline optimum for the empirical distribution of ``durations`` (the schedule knows them all).

    Dynamic programme over check times on a ``step`` grid: a check at t' after one at t is made by the
    jobs still running at t (cost: their fraction) and detects within ``p95`` the jobs ending in
    (max(t, t' - p95), t'] (reward). The weight of the reward (a Lagrange multiplier) is bisected to the
    smallest one whose optimal schedule meets ``coverage``. Being Lagrangian it finds the optimum at the
    coverage it lands on, which can be a little above ``coverage`` (then the true optimum at exactly
    ``coverage`` is a little lower); the result says which coverage it reached."""
    import numpy as np  # the bench extras (matplotlib) bring it; genqueue itself does not need it

    d = np.sort(np.asarray(durations, dtype=float))
    top = float(d[-1]) + p95
    step = max(step, top / 2500)
    grid = np.arange(0.0, top + step, step)
    done = np.searchsorted(d, grid, side="right") / len(d)  # F(t)
    early = np.searchsorted(d, grid - p95, side="left") / len(d)  # P(D < t - p95)
    running = 1.0 - done
    n = len(grid)

    def solve(weight: float) -> list[float]:
        value = np.zeros(n)
        nxt = np.full(n, -1)
        for i in range(n - 2, -1, -1):
            if running[i] <= 0:
                continue
            # Over every later check j > i (slices: the same arithmetic as indexing, without copies).
            cost = (
                running[i] - weight * (done[i + 1 :] - np.maximum(done[i], early[i + 1 :])) + value[i + 1 :]
            )
            k = int(np.argmin(cost))
            value[i], nxt[i] = cost[k], i + 1 + k
        out, i = [], 0
        while nxt[i] >= 0:
            i = int(nxt[i])
            out.append(float(grid[i]))
        return out

    def score(s: list[float]) -> tuple[float, float, float]:
        arr = np.asarray(s)
        idx = np.searchsorted(arr, d)
        late = arr[idx] - d
        return float((idx + 1).mean()), float(np.mean(late <= p95 + 1e-9)), float(np.quantile(late, 0.95))

    lo, hi = 0.0, 1000.0
    best: Frontier | None = None
    for _ in range(28):
        mid = (lo + hi) / 2
        s = solve(mid)
        gets, cov, q = score(s)
        if cov >= coverage:
            hi, best = mid, Frontier(gets, cov, q, s)
        else:
            lo = mid
    if best is None:
        s = [float(t) for t in np.arange(p95, top + p95, p95)]
        gets, cov, q = score(s)
        best = Frontier(gets, cov, q, s)
    # The multiplier jumps between schedules; spend what coverage is left above the target by
    # dropping, one at a time, the check whose removal saves the most while the target still holds.
    while True:
        options = []
        for k in range(len(best.schedule) - 1):  # the last check stays: every job must be found
            s = best.schedule[:k] + best.schedule[k + 1 :]
            gets, cov, q = score(s)
            if cov >= coverage and q <= p95 + 1e-9 and gets < best.gets_per_job:
                options.append(Frontier(gets, cov, q, s))
        if not options:
            return best
        best = min(options, key=lambda f: f.gets_per_job)
