"""Poll policy arithmetic in ``genq.polling``: exact sequences, jitter bounds, error backoff, deadlines."""

from __future__ import annotations

import random
import statistics

import pytest

from genq.polling import clamp_to_deadline, error_delay, poll_delay
from genq.settings import PollPolicy


class FixedRng(random.Random):
    """``uniform`` always returns the same offset: makes the jitter of ``error_delay`` predictable."""

    def __init__(self, offset: float) -> None:
        super().__init__(0)
        self.offset = offset
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return self.offset


def policy(**overrides: float) -> PollPolicy:
    fields: dict[str, float] = {
        "first_delay": 3,
        "interval": 2,
        "backoff": 1.5,
        "max_interval": 10,
        "jitter": 0,
        "deadline": 600,
    }
    fields.update(overrides)
    return PollPolicy(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ poll_delay


def test_poll_delay_exact_sequence_without_jitter() -> None:
    p = policy()
    # first_delay, then interval * backoff ** (n - 1), capped at max_interval.
    assert [poll_delay(p, n) for n in range(8)] == [3.0, 2.0, 3.0, 4.5, 6.75, 10.0, 10.0, 10.0]


def test_poll_delay_formula_matches_for_many_polls() -> None:
    p = policy(first_delay=7, interval=1.25, backoff=1.1, max_interval=30)
    for n in range(1, 200):
        assert poll_delay(p, n) == pytest.approx(min(30.0, 1.25 * 1.1 ** (n - 1)))
    assert poll_delay(p, 0) == 7.0


def test_poll_delay_without_backoff_is_constant() -> None:
    p = policy(first_delay=300, interval=300, backoff=1.0, max_interval=300)
    assert {poll_delay(p, n) for n in range(50)} == {300.0}


def test_poll_delay_returns_floats() -> None:
    assert all(type(poll_delay(policy(), n)) is float for n in range(4))


def test_poll_delay_without_jitter_ignores_the_rng() -> None:
    rng = FixedRng(0.5)
    assert poll_delay(policy(), 3, rng) == 4.5
    assert rng.calls == []


@pytest.mark.parametrize(
    "fields",
    [
        # interval * backoff ** n overflows a float after ~1750 polls here: the cap must win first.
        {"first_delay": 1, "interval": 0.5, "backoff": 1.5, "max_interval": 1, "deadline": 7200},
        {"first_delay": 1, "interval": 1, "backoff": 2, "max_interval": 1, "deadline": 7200},
        {"first_delay": 1, "interval": 1, "backoff": 1.0001, "max_interval": 5, "deadline": 7200},
    ],
)
def test_poll_delay_many_polls_stay_at_the_cap(fields: dict[str, float]) -> None:
    p = policy(**fields)
    for n in (10**5, 10**6, 10**9):
        assert poll_delay(p, n) == p.max_interval


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_poll_delay_jitter_stays_within_bounds_and_varies(seed: int) -> None:
    jitter = 0.2
    p = policy(jitter=jitter)
    rng = random.Random(seed)
    for n, base in [(0, 3.0), (1, 2.0), (3, 4.5), (10, 10.0)]:
        draws = [poll_delay(p, n, rng) for _ in range(1000)]
        assert min(draws) >= base * (1 - jitter)
        assert max(draws) <= base * (1 + jitter)
        assert len(set(draws)) > 990  # actually random, not a constant
        assert min(draws) < base * (1 - jitter / 2)  # reaches well into both halves of the band
        assert max(draws) > base * (1 + jitter / 2)
        assert statistics.fmean(draws) == pytest.approx(base, rel=0.02)


def test_poll_delay_jitter_is_reproducible_with_a_seeded_rng() -> None:
    p = policy(jitter=0.3)
    first = [poll_delay(p, n % 6, random.Random(42)) for n in range(20)]
    again = [poll_delay(p, n % 6, random.Random(42)) for n in range(20)]
    assert first == again


def test_poll_delay_jitter_spreads_the_capped_wait_too() -> None:
    p = policy(jitter=0.1)
    rng = FixedRng(0.1)
    assert poll_delay(p, 50, rng) == pytest.approx(11.0)
    assert rng.calls == [(-0.1, 0.1)]


def test_poll_delay_uses_module_random_without_rng() -> None:
    p = policy(jitter=0.5)
    draws = {poll_delay(p, 1) for _ in range(200)}
    assert len(draws) > 150
    assert all(1.0 <= d <= 3.0 for d in draws)


# ------------------------------------------------------------------ error_delay


def test_error_delay_doubles_from_base() -> None:
    rng = FixedRng(0.0)
    assert [error_delay(2.0, n, None, 1000.0, rng) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0]


def test_error_delay_zero_errors_is_the_base() -> None:
    assert error_delay(3.0, 0, None, 60.0, FixedRng(0.0)) == 3.0


def test_error_delay_is_capped() -> None:
    rng = FixedRng(0.0)
    assert error_delay(2.0, 6, None, 60.0, rng) == 60.0
    assert error_delay(2.0, 30, None, 60.0, rng) == 60.0
    assert error_delay(2.0, 5, None, 60.0, rng) == 32.0


def test_error_delay_jitter_is_twenty_percent_around_the_capped_value() -> None:
    rng = random.Random(7)
    for n, expected in [(1, 2.0), (3, 8.0), (10, 60.0)]:
        draws = [error_delay(2.0, n, None, 60.0, rng) for _ in range(1000)]
        assert min(draws) >= expected * 0.8
        assert max(draws) <= expected * 1.2
        assert len(set(draws)) > 990
    # The spread is applied after the cap, so the cap can be exceeded by the jitter, never more.
    assert error_delay(2.0, 10, None, 60.0, FixedRng(0.2)) == pytest.approx(72.0)
    assert error_delay(2.0, 10, None, 60.0, FixedRng(-0.2)) == pytest.approx(48.0)


@pytest.mark.parametrize("seed", range(5))
def test_error_delay_never_below_retry_after(seed: int) -> None:
    rng = random.Random(seed)
    for n in range(1, 12):
        for retry_after in (0.0, 0.5, 5.0, 30.0, 500.0):
            delay = error_delay(2.0, n, retry_after, 60.0, rng)
            assert delay >= retry_after
    # Retry-After beats the cap: the upstream asked for it.
    assert error_delay(2.0, 1, 500.0, 60.0, rng) == 500.0
    assert error_delay(2.0, 1, 30.0, 60.0, FixedRng(0.0)) == 30.0


def test_error_delay_small_retry_after_does_not_shorten() -> None:
    assert error_delay(2.0, 4, 1.0, 60.0, FixedRng(0.0)) == 16.0
    assert error_delay(2.0, 4, None, 60.0, FixedRng(0.0)) == 16.0


# ------------------------------------------------------------------ clamp_to_deadline


@pytest.mark.parametrize(
    ("delay", "now", "deadline_at", "expected"),
    [
        (3.0, 100.0, 200.0, 3.0),  # well before the deadline
        (10.0, 100.0, 105.0, 5.0),  # would overshoot: wait exactly until the deadline
        (5.0, 100.0, 105.0, 5.0),  # lands on the deadline
        (5.0, 105.0, 105.0, 0.0),  # at the deadline: check now
        (5.0, 110.0, 105.0, 0.0),  # past it: never negative
        (0.0, 100.0, 200.0, 0.0),
    ],
)
def test_clamp_to_deadline(delay: float, now: float, deadline_at: float, expected: float) -> None:
    assert clamp_to_deadline(delay, now, deadline_at) == expected
