"""Pure arithmetic of the benchmarks: percentiles, ratios, goal checks. No I/O, no services."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks; None if empty.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    >>> percentile([5.0], 95)
    5.0
    """
    data = sorted(float(v) for v in values)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def summary(values: Iterable[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p95, p99, max of a sample (None where empty)."""
    data = [float(v) for v in values]
    if not data:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "count": len(data),
        "mean": sum(data) / len(data),
        "p50": percentile(data, 50),
        "p95": percentile(data, 95),
        "p99": percentile(data, 99),
        "max": max(data),
    }


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def spread(values: Iterable[float | None]) -> tuple[float, float] | None:
    """(min, max) of the values present: the range a ratio took over rounds; None if none.

    >>> spread([1.0, None, 0.5, 2.0])
    (0.5, 2.0)
    """
    data = [float(v) for v in values if v is not None]
    return (min(data), max(data)) if data else None


def fmt_spread(values: tuple[float, float] | None) -> str:
    """``min-max`` in the table's short form, '' when there is no spread."""
    return "" if values is None else f"{fmt(values[0])}-{fmt(values[1])}"


def per_item(total: float, items: int) -> float | None:
    """``total / items``; None for no items."""
    return None if items <= 0 else total / items


@dataclass(frozen=True)
class Goal:
    """A goal on one figure: ``figure <op> threshold``, op one of ``>=`` or ``<=``."""

    text: str
    figure: str
    op: str
    threshold: float

    def check(self, value: float | None) -> tuple[bool, str]:
        """(met, reason). A missing value misses the goal with that reason."""
        if value is None:
            return False, f"{self.figure} could not be measured"
        if self.op == ">=":
            met = value >= self.threshold
        elif self.op == "<=":
            met = value <= self.threshold
        else:
            raise ValueError(f"unknown operator {self.op!r}")
        verdict = "met" if met else "missed"
        return met, f"{verdict}: {self.figure} = {fmt(value)} (goal {self.op} {fmt(self.threshold)})"


def fmt(value: Any, digits: int = 3) -> str:
    """A short human form: numbers to ``digits`` significant figures, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 10 ** (digits + 2):
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if magnitude < 10**digits else f"{value:,.0f}"
    return str(value)
