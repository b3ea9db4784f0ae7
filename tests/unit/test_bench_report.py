"""The benchmark report: one JSON key per benchmark with figures, baseline and ratios; the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.result import (
    BenchResult,
    ChartItem,
    Row,
    chart,
    clean,
    document,
    table,
    timings,
    write_json,
)
from benchmarks.stats import Goal


def _result(value: float) -> BenchResult:
    r = BenchResult("slots", "Slot efficiency")
    r.size = {"jobs": 200}
    r.figures = {"jobs_per_s": value}
    r.baseline = {"jobs_per_s": 2.0}
    r.ratios = {"speedup": value / 2.0}
    met = r.check(Goal("30x", "speedup", ">=", 30), r.ratios["speedup"], "too slow")
    r.rows = [Row("jobs/s", value, 2.0, value / 2.0, "jobs/s", ">= 30x", met)]
    r.chart = [ChartItem("throughput", "jobs/s", value, 2.0, "jobs/s")]
    return r


def test_document_has_one_key_per_benchmark_with_figures_baseline_and_ratio(tmp_path: Path) -> None:
    doc = document(
        [_result(80.0), BenchResult("capacity", "Capacity", error="Traceback\nboom")], {"mode": "quick"}
    )
    assert set(doc) == {"_meta", "slots", "capacity"}
    slots = doc["slots"]
    for key in ("figures", "baseline", "ratios", "goals", "met", "table", "size", "notes", "seconds"):
        assert key in slots
    assert slots["ratios"]["speedup"] == 40.0
    assert slots["met"] is True
    assert slots["goals"][0]["met"] is True and slots["goals"][0]["value"] == 40.0
    assert doc["capacity"]["met"] is False and "boom" in doc["capacity"]["error"]
    out = tmp_path / "r" / "bench.json"
    write_json(doc, out)
    assert json.loads(out.read_text()) == doc


def test_a_missed_goal_is_data_with_its_reason_not_an_exception() -> None:
    r = _result(42.0)  # 21x
    assert r.met is False
    goal = r.to_json()["goals"][0]
    assert goal["met"] is False
    assert "too slow" in goal["reason"] and "21" in goal["reason"]


def test_no_goal_means_met_is_none() -> None:
    assert BenchResult("simulator", "sim").met is None


def test_clean_makes_json_safe_values() -> None:
    assert clean({"a": math.nan, "b": (1, math.inf), 3: [2.5]}) == {"a": None, "b": [1, None], "3": [2.5]}


def test_table_lists_every_row_and_every_verdict() -> None:
    text = table([_result(80.0), _result(42.0), BenchResult("training", "t", error="x\nValueError: bad")])
    assert "benchmark" in text.splitlines()[0]
    assert text.count("jobs/s") >= 2
    assert "[met] slots" in text and "[MISSED] slots" in text
    assert "[ERROR] training: ValueError: bad" in text


def test_chart_is_written_or_skipped_without_matplotlib(tmp_path: Path) -> None:
    path = chart([_result(80.0)], tmp_path / "c.png", "t")
    assert path is None or (path.exists() and path.stat().st_size > 0)


def test_timings_name_each_benchmark_and_the_sum() -> None:
    a, b = _result(80.0), BenchResult("capacity", "Capacity")
    a.seconds, b.seconds = 12.4, 30.0
    line = timings([a, b])
    assert "slots 12s" in line and "capacity 30s" in line and "sum 42s" in line
