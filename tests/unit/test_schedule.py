"""Adaptive poll schedule arithmetic in ``genq.schedule`` (pure: no Redis, no clock)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from genq import schedule
from genq.schedule import EDGES, Histogram, Learned, bin_of, first_poll, job_classes, next_poll, spread


def lognormal(n: int, median: float, sigma: float, seed: int = 3) -> list[float]:
    rng = random.Random(seed)
    return [median * math.exp(sigma * rng.gauss(0, 1)) for _ in range(n)]


def learn_exactly(durations: list[float], half_life: float = 1e9) -> Learned:
    """A histogram of exact durations (tiny intervals): what a perfectly informed learner holds."""
    h = Histogram(half_life)
    for d in durations:
        h.observe(d * 0.999, d)
    found = h.learned()
    assert found is not None
    return found


def run(first: float, gap: float, d: float) -> tuple[int, float]:
    """(checks, detection latency) of a job of ``d`` seconds checked at first, first + gap, ..."""
    n = 1 if d <= first else 1 + math.ceil((d - first) / gap)
    return n, first + (n - 1) * gap - d


# ------------------------------------------------------------------ bins and spreading


@given(st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
def test_every_duration_falls_in_the_bin_that_holds_it(d: float) -> None:
    i = bin_of(d)
    assert 0 <= i < schedule.BINS
    if 0 < d <= schedule.BIN_LAST:
        assert EDGES[i] < d <= EDGES[i + 1] or (i == 0 and d <= EDGES[1])


@given(
    st.floats(min_value=0.0, max_value=5000, allow_nan=False),
    st.floats(min_value=0.0, max_value=500, allow_nan=False),
)
@example(1.0, 100.16015625)  # found by CI: hi a hair past a bin's edge
def test_spread_weights_sum_to_one_inside_the_interval(lo: float, width: float) -> None:
    hi = lo + width
    w = spread(lo, hi)
    assert sum(w.values()) == pytest.approx(1.0, abs=0.01)
    top = bin_of(hi)
    assert min(w) >= bin_of(lo) - (1 if lo > 0 else 0) and max(w) <= top
    if max(w) < top:
        # hi just past the top bin's edge: its sliver of the mass rounds to 0 at four decimals.
        edge = schedule.EDGES[top]
        sliver = (hi * hi - edge * edge) / (hi * hi) if lo == 0 else (hi - edge) / (hi - lo)
        assert max(w) == top - 1 and sliver < 0.00005, (max(w), top, sliver)


def test_found_at_first_check_spreads_as_a_ramp_and_later_intervals_uniformly() -> None:
    ramp = spread(0.0, 8.0)
    learned = Learned(tuple(ramp.get(i, 0.0) for i in range(schedule.BINS)), 1.0)
    # Density rising linearly from 0: F(x) = (x / 8)^2.
    assert learned.cdf(4.0) == pytest.approx(0.25, abs=0.02)
    assert learned.cdf(2.0) == pytest.approx(1 / 16, abs=0.02)
    flat = spread(20.0, 30.0)
    learned = Learned(tuple(flat.get(i, 0.0) for i in range(schedule.BINS)), 1.0)
    assert learned.cdf(25.0) == pytest.approx(0.5, abs=0.02)


def test_quantile_inverts_cdf() -> None:
    learned = learn_exactly(lognormal(2000, 8.0, 0.75))
    for p in (0.02, 0.1, 0.5, 0.9, 0.99):
        assert learned.cdf(learned.quantile(p)) == pytest.approx(p, abs=0.005)
    # And matches the true log-normal quantile within the bin resolution.
    assert learned.quantile(0.5) == pytest.approx(8.0, rel=0.08)


# ------------------------------------------------------------------ decay


def test_recent_observations_weigh_more() -> None:
    h = Histogram(half_life=10)
    for _ in range(100):
        h.observe(9.9, 10.0)
    for _ in range(10):
        h.observe(19.9, 20.0)
    learned = h.learned()
    assert learned is not None
    # Ten new ones, one half-life: half the weight, although a tenth of the count.
    assert learned.cdf(15.0) == pytest.approx(0.5, abs=0.02)
    # Effective samples: at most about half_life / ln 2.
    assert 10 < learned.samples <= 10 / math.log(2) + 1


def test_rescaling_keeps_the_distribution() -> None:
    h = Histogram(half_life=1)  # the weight doubles per observation: rescales every 30 or so
    for i in range(200):
        h.observe(i % 7 + 1.0, i % 7 + 1.5)
    assert h.scale <= schedule.RESCALE_AT
    learned = h.learned()
    assert learned is not None and sum(learned.masses) == pytest.approx(1.0, abs=1e-3)


def test_from_hash_reads_what_redis_returns() -> None:
    raw = {b"b3": b"2.0", b"b40": b"6.0", b"n": b"8.0", b"s": b"2.0"}
    learned = Learned.from_hash(raw)
    assert learned is not None
    assert learned.masses[3] == 0.25 and learned.masses[40] == 0.75 and learned.samples == 4.0
    assert Learned.from_hash({}) is None


# ------------------------------------------------------------------ the schedule


def test_cold_start_is_a_fixed_gap_loop() -> None:
    assert first_poll(None, 4.6, 0.03, 20) == 4.6
    few = learn_exactly(lognormal(10, 90.0, 0.4))
    assert first_poll(Learned(few.masses, 10.0), 4.6, 0.03, 20) == 4.6


def test_first_check_waits_for_all_but_skip_and_one_gap() -> None:
    durations = lognormal(5000, 90.0, 0.4)
    learned = learn_exactly(durations)
    first = first_poll(learned, 4.6, 0.03, 20)
    q = sorted(durations)[int(0.03 * len(durations))]
    assert first == pytest.approx(q + 4.6, rel=0.05)
    late = [d for d in durations if run(first, 4.6, d)[1] > 4.6]
    assert len(late) / len(durations) == pytest.approx(0.03, abs=0.01)


@pytest.mark.parametrize(("median", "sigma"), [(8.0, 0.75), (90.0, 0.4), (600.0, 0.2)])
def test_fewer_checks_than_a_5s_loop_with_a_lower_p95(median: float, sigma: float) -> None:
    durations = lognormal(4000, median, sigma)
    learned = learn_exactly(durations)
    first = first_poll(learned, 4.6, 0.03, 20)
    ours = [run(first, 4.6, d) for d in durations]
    loop = [run(5.0, 5.0, d) for d in durations]
    assert sum(n for n, _ in ours) <= sum(n for n, _ in loop)
    p95 = sorted(lat for _, lat in ours)[int(0.95 * len(ours))]
    loop_p95 = sorted(lat for _, lat in loop)[int(0.95 * len(loop))]
    assert p95 <= loop_p95


def test_learning_from_what_polling_sees_converges() -> None:
    """Censored observations only (the learner never sees true durations): the first check settles
    where every job past it is found within the gap and few finish more than a gap before it."""
    rng = random.Random(5)
    h = Histogram(half_life=50)
    gap, lat = 4.6, []
    for _ in range(3000):
        d = 8.0 * math.exp(0.75 * rng.gauss(0, 1))
        first = first_poll(h.learned(), gap, 0.03, 20)
        n, late = run(first, gap, d)
        lat.append(late)
        at = first + (n - 1) * gap
        h.observe(0.0 if n == 1 else at - gap, at)
    recent = sorted(lat[1000:])
    assert recent[int(0.95 * len(recent))] <= gap
    assert first > gap  # learned: later than the cold start


def test_an_upstream_slowdown_costs_checks_not_latency_and_is_unlearned_after() -> None:
    rng = random.Random(9)
    h = Histogram(half_life=50)
    gap, phases = 4.6, {"before": [], "slow": [], "after": []}
    for phase, factor in (("before", 1.0), ("slow", 2.0), ("after", 1.0)):
        for _ in range(600):
            d = factor * 90.0 * math.exp(0.4 * rng.gauss(0, 1))
            first = first_poll(h.learned(), gap, 0.03, 20)
            n, late = run(first, gap, d)
            phases[phase].append(late)
            at = first + (n - 1) * gap
            h.observe(0.0 if n == 1 else at - gap, at)
    for phase, lat in phases.items():
        settled = sorted(lat[100:])  # past the first 100 jobs of the phase
        assert settled[int(0.95 * len(settled))] <= gap, phase
    assert sorted(phases["slow"])[int(0.95 * 600)] <= gap  # slower jobs: never detected later


def test_next_check_keeps_the_grid_from_the_post() -> None:
    assert next_poll(10.0, 10.2, 4.6, 1.15) == pytest.approx(14.6)
    # A check that ran 3 s late: the next is still on the grid, not 4.6 s after it ran.
    assert next_poll(10.0, 13.0, 4.6, 1.15) == pytest.approx(14.6)
    # Later than that: skip to the slot after.
    assert next_poll(10.0, 14.0, 4.6, 1.15) == pytest.approx(19.2)


def test_classes_most_specific_first() -> None:
    assert job_classes("upscale", {"factor": 4, "image_id": "x"}) == ["upscale:-:x4", "upscale"]
    assert job_classes("image", {"prompt": "p"}) == ["image:-:1024x1024x1", "image"]
    assert job_classes("other", {}) == ["other"]
