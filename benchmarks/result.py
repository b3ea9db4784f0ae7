"""What one benchmark reports: its figures, its baseline's, the ratios, the goals and whether each is met.

Pure data and formatting (no services): the JSON document, the table and the chart are built from these.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.stats import Goal, fmt, fmt_spread

SCHEMA_VERSION = 1


@dataclass
class Row:
    """One line of the printed table: a figure of genqueue beside its baseline's."""

    figure: str
    value: float | None
    baseline: float | None = None
    ratio: float | None = None
    unit: str = ""
    goal: str = ""
    met: bool | None = None
    # (min, max) of the ratio over rounds: a ratio without its spread hides how noisy the run was.
    spread: tuple[float, float] | None = None


@dataclass
class ChartItem:
    """One pair of bars in the chart: ``group`` is 'throughput' or 'latency'."""

    group: str
    label: str
    value: float | None
    baseline: float | None
    unit: str


@dataclass
class BenchResult:
    name: str
    title: str
    size: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, Any] = field(default_factory=dict)
    goals: list[dict[str, Any]] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    chart: list[ChartItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def check(self, goal: Goal, value: float | None, why_missed: str = "") -> bool:
        """Record a goal and whether ``value`` meets it; ``why_missed`` explains a miss."""
        met, verdict = goal.check(value)
        entry: dict[str, Any] = {"goal": goal.text, "figure": goal.figure, "value": value, "met": met}
        entry["reason"] = verdict if met or not why_missed else f"{verdict}; {why_missed}"
        self.goals.append(entry)
        return met

    @property
    def met(self) -> bool | None:
        """True when every goal is met, False when one is missed, None when none was checked."""
        if self.error is not None:
            return False
        if not self.goals:
            return None
        return all(g["met"] for g in self.goals)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["met"] = self.met
        out.pop("rows")
        out["table"] = [asdict(r) for r in self.rows]
        return clean(out)


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, tuples lists, keys strings."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def document(results: list[BenchResult], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: one key per benchmark, plus ``_meta``."""
    doc: dict[str, Any] = {"_meta": clean({"schema": SCHEMA_VERSION, **meta})}
    for result in results:
        doc[result.name] = result.to_json()
    return doc


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def table(results: list[BenchResult]) -> str:
    """A plain-text table: one line per figure, then each goal with its verdict."""
    header = ("benchmark", "figure", "genqueue", "baseline", "ratio (min-max)", "goal", "met")
    lines: list[tuple[str, ...]] = []
    for result in results:
        if result.error is not None:
            lines.append((result.name, "ERROR", result.error.splitlines()[-1][:60], "", "", "", "no"))
            continue
        for i, row in enumerate(result.rows):
            unit = f" {row.unit}" if row.unit else ""
            lines.append(
                (
                    result.name if i == 0 else "",
                    row.figure,
                    fmt(row.value) + unit,
                    fmt(row.baseline) + (unit if row.baseline is not None else ""),
                    fmt(row.ratio)
                    + ("x" if row.ratio is not None else "")
                    + (f" ({fmt_spread(row.spread)})" if row.spread else ""),
                    row.goal,
                    "" if row.met is None else ("yes" if row.met else "NO"),
                )
            )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    verdicts = []
    for result in results:
        for g in result.goals:
            verdicts.append(
                f"[{'met' if g['met'] else 'MISSED'}] {result.name}: {g['goal']} -- {g['reason']}"
            )
        if result.error is not None:
            verdicts.append(f"[ERROR] {result.name}: {result.error.splitlines()[-1]}")
    return "\n".join([*out, "", *verdicts])


def timings(results: list[BenchResult]) -> str:
    """Wall time per benchmark, set-up and tear-down included: where a run's minutes went."""
    total = sum(r.seconds for r in results)
    parts = ", ".join(f"{r.name} {r.seconds:.0f}s" for r in results)
    return f"wall time per benchmark: {parts} (sum {total:.0f}s)"


def chart(results: list[BenchResult], path: Path, title: str) -> Path | None:
    """A PNG: throughput pairs on the left, latency pairs on the right (genqueue beside its baseline).

    Returns None when matplotlib is not installed (``pip install -e '.[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = {"throughput": [], "latency": []}  # type: dict[str, list[ChartItem]]
    for result in results:
        for item in result.chart:
            groups.setdefault(item.group, []).append(item)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, (group, items) in zip(axes, groups.items(), strict=False):
        ax.set_title(
            "throughput (higher is better)" if group == "throughput" else "latency (lower is better)"
        )
        if not items:
            ax.text(0.5, 0.5, "no figures", ha="center", va="center", transform=ax.transAxes)
            continue
        labels = [f"{i.label}\n[{i.unit}]" for i in items]
        ys = range(len(items))
        height = 0.38
        values = [i.value or 0.0 for i in items]
        bases = [i.baseline or 0.0 for i in items]
        # Each pair is normalised to its larger bar, so figures of different units share one axis.
        scale = [max(v, b) or 1.0 for v, b in zip(values, bases, strict=True)]
        ax.barh(
            [y - height / 2 for y in ys],
            [v / s for v, s in zip(values, scale, strict=True)],
            height,
            label="genqueue",
            color="#2b6cb0",
        )
        ax.barh(
            [y + height / 2 for y in ys],
            [b / s for b, s in zip(bases, scale, strict=True)],
            height,
            label="baseline",
            color="#a0aec0",
        )
        for y, item, v, b, sc in zip(ys, items, values, bases, scale, strict=True):
            ax.text(v / sc + 0.01, y - height / 2, fmt(item.value), va="center", fontsize=8)
            shown = "no baseline" if item.baseline is None else fmt(item.baseline)
            ax.text(b / sc + 0.01, y + height / 2, shown, va="center", fontsize=8)
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.25)
        ax.set_xticks([])
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
