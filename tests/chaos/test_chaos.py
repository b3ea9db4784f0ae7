"""The chaos suite. `make test` runs the short version; `make chaos` the full one (marked slow)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from genq.simulator import SimConfig
from tests.chaos.harness import Chaos, Figures, Plan
from tests.helpers import Stack

pytestmark = pytest.mark.integration
ARTIFACTS = Path(os.environ.get("GENQ_ARTIFACTS", "test-artifacts"))


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(api_key="test-key-0d9f", images_per_job=1, seed=11)


def _check(figures: Figures) -> None:
    assert figures.lost == 0, figures.line()
    assert figures.terminal == figures.accepted, figures.line()
    assert figures.failed_without_reason == 0, figures.line()
    assert figures.max_posts_per_job <= 1, figures.line()
    assert figures.sha_mismatches == 0, figures.line()
    assert figures.partial_files == 0, figures.line()
    assert figures.max_rate_1s <= figures.rate_limit, figures.line()
    assert figures.succeeded > figures.accepted // 2, figures.line()
    # With budgets on: no paid POST past any cap, and the cap did bite (some jobs were rejected).
    if figures.trigger_cap is not None:
        assert figures.max_posts_per_day <= figures.trigger_cap, figures.line()
        assert figures.rejected > 0, figures.line()
    if figures.cost_cap is not None:
        assert figures.max_cost_per_day <= figures.cost_cap, figures.line()


def _run(stack: Stack, plan: Plan, name: str) -> Figures:
    chaos = Chaos(stack, plan)
    figures = chaos.run()
    chaos.write(ARTIFACTS / f"{name}.json")
    if figures.lost:
        # Keep the evidence: every process's log, beside the figures.
        logs = ARTIFACTS / f"{name}-logs"
        logs.mkdir(parents=True, exist_ok=True)
        for log in [*stack.tmp.glob("*.log"), *stack.tmp.glob("*.stderr")]:
            shutil.copy(log, logs / log.name)
    print("\n" + figures.line())
    return figures


def test_chaos_short(stack: Stack) -> None:
    """~100 jobs, one worker kill, one Redis crash, 10% 5xx, 429 bursts, slow spells; budgets on: a
    total trigger cap (about 85 % of the POSTs the jobs need), the producer's cost cap and quota."""
    plan = Plan(
        jobs=100,
        kill_every=6,
        kills=2,
        redis_restarts=1,
        submit_seconds=15,
        trigger_cap=90,
        cost_cap=140,
        max_in_flight=24,
    )
    figures = _run(stack, plan, "chaos-short")
    _check(figures)
    assert figures.kills + figures.child_kills >= 1 and figures.redis_restarts == 1


@pytest.mark.slow
def test_chaos_full(stack: Stack) -> None:
    """500 jobs of mixed kinds, a kill every few seconds, two Redis crashes."""
    plan = Plan(
        jobs=500,
        kill_every=4,
        kills=30,
        redis_restarts=2,
        submit_seconds=90,
        trigger_cap=460,
        cost_cap=700,
        max_in_flight=40,
    )
    figures = _run(stack, plan, "chaos-full")
    _check(figures)
    assert figures.redis_restarts == 2
