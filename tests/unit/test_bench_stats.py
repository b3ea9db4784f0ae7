"""The benchmark harness's arithmetic: percentiles, ratios and goal checks."""

from __future__ import annotations

import math

import pytest

from benchmarks.stats import Goal, fmt, median, per_item, percentile, ratio, summary


def test_percentile_interpolates_between_closest_ranks() -> None:
    data = [4, 1, 3, 2]  # unsorted on purpose
    assert percentile(data, 0) == 1
    assert percentile(data, 100) == 4
    assert percentile(data, 50) == 2.5
    assert percentile(data, 95) == pytest.approx(3.85)


def test_percentile_of_one_value_and_of_nothing() -> None:
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1, 2], 101)


def test_percentile_matches_numpy_linear_method_on_a_known_sample() -> None:
    data = list(range(1, 101))  # 1..100
    assert percentile(data, 95) == pytest.approx(95.05)
    assert percentile(data, 50) == pytest.approx(50.5)
    assert median([3, 1, 2]) == 2


def test_summary_shape_and_values() -> None:
    s = summary([1.0, 2.0, 3.0, 10.0])
    assert set(s) == {"count", "mean", "p50", "p95", "p99", "max"}
    assert s["count"] == 4
    assert s["mean"] == 4.0
    assert s["max"] == 10.0
    empty = summary([])
    assert empty["count"] == 0 and empty["p95"] is None


def test_ratio_and_per_item_guard_missing_and_zero() -> None:
    assert ratio(30.0, 1.0) == 30.0
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None
    assert per_item(2048, 2) == 1024
    assert per_item(5, 0) is None


def test_goal_checks_both_directions_and_missing_values() -> None:
    faster = Goal("at least 30x", "speedup", ">=", 30)
    assert faster.check(31.0)[0] is True
    assert faster.check(30.0)[0] is True
    met, reason = faster.check(21.0)
    assert met is False and "missed" in reason and "21" in reason
    smaller = Goal("at most 1 KB", "bytes/job", "<=", 1024)
    assert smaller.check(1000)[0] is True
    assert smaller.check(1025)[0] is False
    met, reason = smaller.check(None)
    assert met is False and "could not be measured" in reason
    with pytest.raises(ValueError):
        Goal("x", "y", "==", 1).check(1)


def test_fmt_is_short_and_total() -> None:
    assert fmt(None) == "-"
    assert fmt(True) == "yes"
    assert fmt(12345) == "12,345"
    assert fmt(0.0) == "0"
    assert fmt(0.123456) == "0.123"
    assert fmt(21.04) == "21"
    assert fmt(1234567.0) == "1,234,567"
    assert fmt(math.nan) == "nan"
    assert fmt("text") == "text"
