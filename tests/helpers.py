"""Test helpers shared by the integration and chaos suites: ``Stack`` (a private Redis, the simulator and
real Celery worker processes, wired together), ``environment``, ``wait_all`` and the fast poll policy.
The fixtures that build them live in ``tests/conftest.py``. Nothing here touches the Redis on 6379."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from genq.celeryconf import QUEUES
from genq.embedded import EmbeddedRedis
from genq.ledger import Ledger
from genq.processes import BeatProcess, WorkerProcess
from genq.producer import Producer
from genq.services import redis_client
from genq.settings import Settings, get_settings, load_settings
from genq.simulator import SimulatorProcess

FAST_POLL = '{"first_delay": 0.3, "interval": 0.3, "backoff": 1.2, "max_interval": 1, "deadline": 60}'


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Run with exactly these GENQ_* variables (and the rest of os.environ)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()


@dataclass
class Stack:
    """A private Redis, a simulator and the GENQ_* environment that points workers and producers at them."""

    redis: EmbeddedRedis
    sim: SimulatorProcess
    tmp: Path
    env: dict[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)

    @property
    def download_dir(self) -> Path:
        return Path(self.env["GENQ_DOWNLOAD_DIR"])

    def settings(self, **env: str) -> Settings:
        with environment({**self.env, **env}):
            return load_settings()

    def producer(self, **env: str) -> Producer:
        producer = Producer(self.settings(**env))
        self.producers.append(producer)
        return producer

    def ledger(self) -> Ledger:
        return Ledger(redis_client(self.settings()))

    def worker(
        self, queues: tuple[str, ...] = QUEUES, concurrency: int = 2, pool: str = "prefork", **env: str
    ) -> WorkerProcess:
        worker = WorkerProcess(
            {**os.environ, **self.env, **env},
            queues=queues,
            concurrency=concurrency,
            pool=pool,
            log_path=self.tmp / f"worker-{len(self.workers)}.log",
        )
        self.workers.append(worker)
        return worker.start()

    def beat(self, **env: str) -> BeatProcess:
        beat = BeatProcess(
            {**os.environ, **self.env, **env}, log_path=self.tmp / f"beat-{len(self.workers)}.log"
        )
        self.workers.append(beat)
        return beat.start()

    def close(self) -> None:
        for producer in self.producers:
            producer.close()
        for worker in self.workers:
            worker.stop(timeout=10)


def task_runtimes(log_text: str) -> list[tuple[str, float]]:
    """``(task name, seconds)`` for every task a worker log says succeeded."""
    return [
        (m[1], float(m[2]))
        for m in re.finditer(r"Task (genq\.\w+)\[[^\]]+\] succeeded in ([\d.]+)s", log_text)
    ]


def wait_all(producer: Producer, ids: list[str], timeout: float) -> list[Any]:
    """Records of every job once all are terminal; fails with the stragglers' states otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        records = [producer.status(i) for i in ids]
        if all(r.terminal for r in records):
            return records
        if time.monotonic() > deadline:
            stuck = {r.id[:8]: r.state.value for r in records if not r.terminal}
            pytest.fail(f"{len(stuck)} jobs not terminal after {timeout}s: {stuck}")
        time.sleep(0.2)
