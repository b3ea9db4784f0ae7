"""Image generation end to end: real Redis, real worker processes, the simulator as an HTTP server."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest

from genq.schemas import JobState
from genq.simulator import SimConfig
from tests.helpers import Stack, task_runtimes, wait_all

pytestmark = pytest.mark.integration


def test_twenty_jobs_two_images_each_all_succeed_once_each(stack: Stack) -> None:
    stack.worker(concurrency=2)
    producer = stack.producer()
    ids = [producer.submit_image(f"a lighthouse #{i}", num_images=2).id for i in range(20)]

    records = wait_all(producer, ids, timeout=120)

    assert [r.state for r in records] == [JobState.SUCCEEDED] * 20, [r.error for r in records]
    stats = stack.sim.stats()
    assert stats["requests"]["POST /images/generation"] == 20
    for record in records:
        assert record.upstream_id is not None
        assert stats["per_job"][record.upstream_id]["posts"] == 1
        truth = stack.sim.job(record.upstream_id)
        assert len(record.outputs) == 2
        for out, expected in zip(record.outputs, truth["outputs"], strict=True):
            path = Path(out.path)
            assert path.parent == stack.download_dir / record.id
            data = path.read_bytes()
            assert len(data) == out.bytes == expected["size"]
            assert hashlib.sha256(data).hexdigest() == out.sha256 == expected["sha256"]
    leftovers = [p for p in stack.download_dir.rglob("*") if p.name.endswith(".part")]
    assert leftovers == []


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(api_key="test-key-0d9f", images_per_job=1)


def test_no_worker_slot_is_held_while_the_upstream_works(stack: Stack) -> None:
    """Jobs take 10 s upstream; 20 in flight on 2 slots. Every task run is a small fraction of that."""
    slow_poll = '{"first_delay": 1, "interval": 1.5, "backoff": 1.0, "max_interval": 1.5, "deadline": 60}'
    worker = stack.worker(concurrency=2, GENQ_POLL_IMAGE=slow_poll)
    producer = stack.producer(GENQ_POLL_IMAGE=slow_poll)
    ids = [producer.submit_image(f"slow job {i} [sim:duration=10]").id for i in range(20)]

    records = wait_all(producer, ids, timeout=90)

    assert all(r.state is JobState.SUCCEEDED for r in records), [r.error for r in records]
    runtimes = task_runtimes(worker.output() + (stack.tmp / "worker-0.log").read_text())
    polls = [t for name, t in runtimes if name == "genq.poll"]
    assert len(polls) >= 20 * 5, f"expected several polls per job, saw {len(polls)}"
    # With 20 jobs of 10 s on 2 slots, a task that held its slot while waiting would need >= 10 s
    # (and the batch could not finish in 90 s); one tenth of that is a generous upper bound.
    assert max(t for _, t in runtimes) < 1.0, sorted(runtimes, key=lambda r: -r[1])[:5]
    stats = stack.sim.stats()
    for record in records:
        times = stats["per_job"][record.upstream_id]["get_times"]
        assert len(times) >= 5
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) > 0.8, f"polls of one job must be spaced by the policy, got {gaps}"


def test_failed_upstream_job_ends_failed_with_the_upstream_reason(stack: Stack) -> None:
    stack.worker()
    producer = stack.producer()
    job = producer.submit_image("this one fails [sim:fail]")

    (record,) = wait_all(producer, [job.id], timeout=30)

    assert record.state is JobState.FAILED
    assert record.error is not None and "upstream job failed" in record.error
    assert "simulated failure" in record.error
    assert record.outputs == []


def test_wrong_api_key_fails_clearly_without_a_retry_loop(stack: Stack) -> None:
    stack.worker(GENQ_API_KEY="not-the-key")
    producer = stack.producer()
    job = producer.submit_image("a cat")

    (record,) = wait_all(producer, [job.id], timeout=30)

    assert record.state is JobState.FAILED
    assert "401" in (record.error or "") and "GENQ_API_KEY" in (record.error or "")
    assert record.submit_attempts == 1
    stats = stack.sim.stats()
    assert stats["responses"].get("401") == 1
    assert stats["requests"].get("POST /images/generation", 0) == 1
