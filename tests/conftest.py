"""Shared fixtures: a real redis-server on a free port, the simulator as a real HTTP server, and real
Celery worker processes, wired together by one ``Stack`` (``tests/helpers.py``, where the helpers live;
they are re-exported here for the tests that still import them from ``tests.conftest``). Nothing here
touches the Redis on 6379."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from genq.embedded import EmbeddedRedis
from genq.simulator import SimConfig, SimulatorProcess, start_simulator
from tests.helpers import FAST_POLL, Stack, environment, task_runtimes, wait_all

__all__ = ["FAST_POLL", "Stack", "environment", "task_runtimes", "wait_all"]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(data_dir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def sim_config() -> SimConfig:
    """Override in a test module to change the simulator's behaviour."""
    return SimConfig(api_key="test-key-0d9f", images_per_job=2)


@pytest.fixture
def simulator(sim_config: SimConfig) -> Iterator[SimulatorProcess]:
    with start_simulator(sim_config) as sim:
        yield sim


@pytest.fixture
def stack(redis_server: EmbeddedRedis, simulator: SimulatorProcess, tmp_path: Path) -> Iterator[Stack]:
    env = {
        "GENQ_REDIS_URL": redis_server.url,
        "GENQ_API_BASE_URL": simulator.url,
        "GENQ_API_KEY": simulator.api_key,
        "GENQ_DOWNLOAD_DIR": str(tmp_path / "downloads"),
        "GENQ_DOWNLOAD_ALLOW_HTTP": "true",
        "GENQ_DOWNLOAD_ALLOW_PRIVATE": "true",  # the simulator serves files from 127.0.0.1
        "GENQ_POLL_IMAGE": FAST_POLL,
        "GENQ_POLL_ERROR_BACKOFF": "0.2",
        "GENQ_WORKER_SWEEP_INTERVAL": "0.5",
        "GENQ_WORKER_SWEEP_GRACE": "3",
    }
    stack = Stack(redis_server, simulator, tmp_path, env)
    try:
        yield stack
    except BaseException:
        raise
    finally:
        stack.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The model-based runs' seeds and sizes, at the end of every run: a worker of pytest-xdist cannot
    print them itself, but its reports carry them (``record_property``)."""
    lines = [
        str(value)
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        for name, value in getattr(report, "user_properties", [])
        if name == "model_run"
    ]
    if lines:
        terminalreporter.section("model-based runs")
        for line in lines:
            terminalreporter.write_line(line)
