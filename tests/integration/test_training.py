"""Model training readiness: deduplicated train calls, parked generations, failures."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from genq.schemas import JobState, ModelState
from genq.simulator import SimConfig
from tests.conftest import Stack, wait_all

pytestmark = pytest.mark.integration
MODEL_POLL = '{"first_delay": 0.5, "interval": 0.5, "max_interval": 0.5, "deadline": 60}'


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(api_key="test-key-0d9f", images_per_job=1, training_duration=3.0)


def test_concurrent_train_requests_make_one_call_and_release_parked_jobs(stack: Stack) -> None:
    stack.worker(GENQ_POLL_MODEL=MODEL_POLL)
    producer = stack.producer(GENQ_POLL_MODEL=MODEL_POLL)

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda _: producer.train_model("style-1"), range(10)))
    parked = [producer.submit_image(f"in style {i}", model_id="style-1") for i in range(3)]
    assert {p.status().state for p in parked} == {JobState.PARKED}
    time.sleep(1)
    assert stack.sim.stats()["requests"].get("POST /images/generation", 0) == 0  # nothing runs early

    records = wait_all(producer, [p.id for p in parked], timeout=40)

    assert [r.state for r in records] == [JobState.SUCCEEDED] * 3
    model = producer.model_status("style-1")
    assert model.state is ModelState.READY and model.ready_at is not None and model.checks >= 1
    assert model.parked == 0
    stats = stack.sim.stats()
    assert stats["train_calls"] == {"style-1": 1}
    events = [e["event"] for e in model.history]
    assert events[0] == "requested" and events.index("training") < events.index("ready")
    assert [e.get("detail") for e in model.history].count("train call") == 1  # the one claimed call
    assert model.history[-1]["event"] == "ready"
    # Ready and not forced: no second train call.
    assert producer.train_model("style-1").state is ModelState.READY
    time.sleep(0.5)
    assert stack.sim.stats()["train_calls"] == {"style-1": 1}
    assert [m.id for m in producer.list_models()] == ["style-1"]


def test_failed_training_fails_its_parked_generations(stack: Stack) -> None:
    stack.worker(GENQ_POLL_MODEL=MODEL_POLL)
    producer = stack.producer(GENQ_POLL_MODEL=MODEL_POLL)
    producer.train_model("will-fail")
    parked = [producer.submit_image(f"doomed {i}", model_id="will-fail") for i in range(2)]

    records = wait_all(producer, [p.id for p in parked], timeout=40)

    model = producer.model_status("will-fail")
    assert model.state is ModelState.FAILED and "simulated training failure" in (model.error or "")
    for record in records:
        assert record.state is JobState.FAILED
        assert "model will-fail failed" in (record.error or "") and "simulated training failure" in (
            record.error or ""
        )
    assert stack.sim.stats()["requests"].get("POST /images/generation", 0) == 0


def test_a_generation_naming_a_ready_or_unknown_model_runs_at_once(stack: Stack) -> None:
    stack.worker()
    producer = stack.producer()
    record = producer.submit_image("no training involved", model_id="never-trained").wait(timeout=30)
    assert record.state is JobState.SUCCEEDED
