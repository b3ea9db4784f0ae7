"""The sweeper re-drives what a lost message or a dead worker left behind, and dispatches long waits."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from genq.producer import Producer
from genq.schemas import JobState, ModelState
from genq.simulator import SimConfig
from tests.conftest import Stack, wait_all

pytestmark = pytest.mark.integration


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(api_key="test-key-0d9f", images_per_job=1, training_duration=2.0)


def _countdowns_held_until_done(producer: Producer, ids: list[str]) -> list[tuple[int, float]]:
    """Countdown (ETA) tasks the workers hold, sampled with `celery inspect` until every job ends:
    how many, and the longest wait left of any (seconds)."""
    inspect = producer.celery.control.inspect(timeout=1.0)
    samples = []
    while not all(producer.status(i).terminal for i in ids):
        at = time.time()
        tasks = [t for held in (inspect.scheduled() or {}).values() for t in held]
        left = [datetime.fromisoformat(t["eta"]).timestamp() - at for t in tasks]
        samples.append((len(tasks), max(left, default=0.0)))
    return samples


def test_a_lost_poll_message_delays_the_job_by_at_most_the_grace(stack: Stack) -> None:
    """The poll message is deleted from the broker before any worker takes it."""
    stack.worker(queues=("submit", "download"))
    stack.beat()
    producer = stack.producer()
    job = producer.submit_image("lost poll")
    deadline = time.monotonic() + 60  # a worker starting on a busy machine can take a while
    while producer.status(job.id).state is not JobState.SUBMITTED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert producer.status(job.id).state is JobState.SUBMITTED, "never submitted: the test cannot start"
    ledger = stack.ledger()
    assert ledger.redis.llen("poll") >= 1
    ledger.redis.delete("poll")  # the message is gone for good
    due = producer.status(job.id).next_poll_at or time.time()

    stack.worker(queues=("poll",))
    (record,) = wait_all(producer, [job.id], timeout=30)

    assert record.state is JobState.SUCCEEDED
    assert record.poll_gen >= 2  # the sweeper started a new poll generation
    # How soon (the grace and a sweep or two) is a wall-clock figure on a shared machine: printed
    # here, and checked on a fake clock in test_sweeper_steps, not asserted.
    print(f"\n[lost poll] recovered {(record.finished_at or due) - due:.1f}s after its poll was due")


def test_long_waits_are_held_in_redis_and_dispatched_by_the_sweeper(stack: Stack) -> None:
    """With countdown_max below the poll interval, the ledger holds the wait: the only countdowns are
    the sweeper's look-ahead (a poll due before the next sweep, sent with a countdown to its due time),
    none longer than two sweep intervals (0.5 s each here), and jobs still complete on time."""
    env = {
        "GENQ_POLL_COUNTDOWN_MAX": "0.2",
        "GENQ_POLL_IMAGE": '{"first_delay": 1, "interval": 1, "max_interval": 1, "deadline": 60}',
    }
    stack.worker(**env)
    stack.beat(**env)
    producer = stack.producer(**env)
    ids = [producer.submit_image(f"held {i} [sim:duration=3]").id for i in range(5)]
    held_by_workers = _countdowns_held_until_done(producer, ids)

    records = wait_all(producer, ids, timeout=40)

    assert all(r.state is JobState.SUCCEEDED for r in records)
    assert all(r.polls >= 2 for r in records)
    assert len(held_by_workers) >= 2
    # No long countdown ever sat in a worker, only the look-ahead's two sweep intervals (a sample may
    # be read a little before the ETA it shows).
    assert max(left for _, left in held_by_workers) <= 2 * 0.5 + 0.25
    assert "genq.sweep" in (stack.tmp / "worker-0.log").read_text()


def test_short_waits_are_countdowns_held_by_the_worker(stack: Stack) -> None:
    """The baseline for the test above: with the default countdown_max the same polls are ETA tasks."""
    env = {"GENQ_POLL_IMAGE": '{"first_delay": 2, "interval": 2, "max_interval": 2, "deadline": 60}'}
    stack.worker(**env)
    producer = stack.producer(**env)
    ids = [producer.submit_image(f"countdown {i} [sim:duration=3]").id for i in range(5)]
    held_by_workers = _countdowns_held_until_done(producer, ids)
    assert max(n for n, _ in held_by_workers) >= 1


def test_model_checks_minutes_apart_are_held_in_redis(stack: Stack) -> None:
    env = {
        "GENQ_POLL_COUNTDOWN_MAX": "0.2",
        "GENQ_POLL_MODEL": '{"first_delay": 1, "interval": 1, "max_interval": 1, "deadline": 60}',
    }
    stack.worker(**env)
    stack.beat(**env)
    producer = stack.producer(**env)
    producer.train_model("held-model")
    deadline = time.monotonic() + 30
    while producer.model_status("held-model").state is not ModelState.READY and time.monotonic() < deadline:
        time.sleep(0.2)
    model = producer.model_status("held-model")
    assert model.state is ModelState.READY and model.checks >= 1
    assert stack.sim.stats()["train_calls"] == {"held-model": 1}
