"""TrainingService step by step against a real Redis, a fake clock and the upstream mocked with
``responses``: the one claimed train call, its retries and ambiguous outcomes, readiness checks, and
what happens to the jobs parked on the model."""

from __future__ import annotations

from typing import Any

import pytest
import requests
import responses

from genq.actions import Notify, PollModelLater, SubmitLater, TrainLater
from genq.schemas import JobState, ModelState
from tests.integration.steps import (  # noqa: F401  (fixtures)
    API,
    GRACE,
    MODEL_DEADLINE,
    START,
    Steps,
    calls_to,
    model_status,
    shared_redis_fixture,
    steps_fixture,
    train_answer,
    upstream_fixture,
)

pytestmark = pytest.mark.integration
TRAIN = "/models/m1/train"
CHECK = "/models/m1"
WINDOW = 5.0 + 30.0 + 5.0  # connect + read timeout + 5: how long a train call may be in flight
TASK = {"task": "myapp.done", "queue": "myapp"}


def _requested(s: Steps, *parked: str, callback: dict[str, Any] | None = None) -> int:
    gen = s.training.request("m1")
    assert gen == 1
    for job_id in parked:
        assert s.image(job_id, model_id="m1", callback=callback) is JobState.PARKED
    return gen


def _training(s: Steps, upstream: responses.RequestsMock, *parked: str) -> int:
    """Requested and the train call accepted; returns the generation of the first check."""
    _requested(s, *parked)
    train_answer(upstream)
    (check,) = s.training.train("m1", 1)
    assert isinstance(check, PollModelLater)
    return check.gen


# ---------------------------------------------------------------------------- train


def test_train_claims_the_call_in_the_ledger_before_making_it(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _requested(steps)
    seen_during_call: list[Any] = []

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        seen_during_call.append(steps.model())
        return 200, {}, "Training started"

    upstream.add_callback(responses.GET, API + TRAIN, callback=answer)
    steps.clock.advance(2)

    assert steps.training.train("m1", gen) == [PollModelLater("m1", 3, 10.0)]

    (claimed,) = seen_during_call
    assert claimed.state is ModelState.REQUESTED and claimed.poll_gen == 2
    assert claimed.call_started_at == START + 2  # recorded before the call went out
    assert steps.model_due() is not None
    model = steps.model()
    assert (model.state, model.poll_gen, model.train_calls) == (ModelState.TRAINING, 3, 1)
    assert model.started_at == START + 2 and model.errors_in_row == 0
    assert steps.model_due() == START + 2 + 10 + GRACE
    details = [e.get("detail") for e in model.history]
    assert details.count("train call") == 1 and "train call accepted: Training started" in details


def test_a_duplicate_or_stale_train_message_makes_no_second_call(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    _requested(steps)
    train_answer(upstream)

    assert steps.training.train("m1", 1) != []
    assert steps.training.train("m1", 1) == []  # the same message again
    assert steps.training.train("m1", 0) == []  # an older generation
    assert steps.training.train("m1", 3) == []  # training already under way
    assert steps.training.train("unknown", 1) == []

    assert calls_to(upstream, TRAIN) == 1
    assert steps.model().train_calls == 1


def test_throttled_train_call_releases_the_claim_and_comes_back_with_a_new_generation(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    _requested(steps)
    train = train_answer(upstream)
    steps.block_upstream(30)

    (later,) = steps.training.train("m1", 1)

    assert isinstance(later, TrainLater) and later.model_id == "m1" and later.gen == 3
    assert 20 < later.delay <= 30
    assert train.call_count == 0  # nothing was sent
    model = steps.model()
    assert model.state is ModelState.REQUESTED and model.poll_gen == 3
    assert model.call_started_at is None  # the claim is released: the next try may call
    assert model.errors_in_row == 0 and model.train_calls == 0  # a throttle is not an error
    assert steps.training.train("m1", 1) == []  # the old generation is dead

    steps.unblock_upstream()
    assert steps.training.train("m1", later.gen) == [PollModelLater("m1", 5, 10.0)]
    assert train.call_count == 1 and steps.model().train_calls == 1


def test_a_5xx_before_acting_is_retried_with_backoff_then_gives_up(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    _requested(steps, "j1")
    train = train_answer(upstream, status=503, json={"error": "overloaded"})

    (first,) = steps.training.train("m1", 1)
    assert isinstance(first, TrainLater) and first.gen == 3 and 1.6 <= first.delay <= 2.4
    model = steps.model()
    assert (model.state, model.errors_in_row, model.call_started_at) == (ModelState.REQUESTED, 1, None)
    assert "503" in (model.error or "")
    assert steps.model_due() == pytest.approx(START + first.delay + GRACE)

    (second,) = steps.training.train("m1", first.gen)
    assert isinstance(second, TrainLater) and second.gen == 5 and 3.2 <= second.delay <= 4.8

    assert steps.training.train("m1", second.gen) == []  # the third in a row: max_errors

    model = steps.model()
    assert model.state is ModelState.FAILED and "train call failed 3 times in a row" in (model.error or "")
    assert train.call_count == 3
    job = steps.job("j1")
    assert job.state is JobState.FAILED and job.error == f"model m1 failed: {model.error}"


def test_a_5xx_with_a_long_retry_after_is_held_for_the_sweeper(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    _requested(steps)
    train_answer(upstream, status=503, headers={"Retry-After": "120"})

    assert steps.training.train("m1", 1) == []  # over countdown_max: held in Redis, no message

    assert steps.model().poll_gen == 3 and steps.model().call_started_at is None
    assert steps.model_due() == START + 120  # no grace: the sweeper sends it right when due
    steps.clock.advance(119)
    assert steps.sweeper.sweep()[0] == []
    steps.clock.advance(1)
    assert steps.sweeper.sweep()[0] == [TrainLater("m1", 0.0, 4)]


@pytest.mark.parametrize(
    "error",
    [requests.ConnectTimeout("connect timeout"), requests.ConnectionError("Connection refused")],
    ids=["connect-timeout", "refused"],
)
def test_a_call_that_never_left_is_made_again_later(
    steps: Steps, upstream: responses.RequestsMock, error: Exception
) -> None:
    _requested(steps)
    train = train_answer(upstream, body=error)

    (later,) = steps.training.train("m1", 1)

    assert isinstance(later, TrainLater) and later.gen == 3
    model = steps.model()
    assert (model.state, model.call_started_at, model.errors_in_row) == (ModelState.REQUESTED, None, 1)
    train_answer(upstream)
    assert steps.training.train("m1", later.gen) == [PollModelLater("m1", 5, 10.0)]
    assert calls_to(upstream, TRAIN) == 2 and train.call_count == 1
    assert steps.model().train_calls == 1


@pytest.mark.parametrize(
    "answer",
    [
        {"body": requests.ReadTimeout("slow")},
        {"status": 504, "body": "gateway timeout"},
    ],
    ids=["read-timeout", "gateway-504"],
)
def test_an_ambiguous_train_call_is_never_repeated_readiness_checks_tell(
    steps: Steps, upstream: responses.RequestsMock, answer: dict[str, Any]
) -> None:
    _requested(steps, "j1")
    train = train_answer(upstream, **answer)

    assert steps.training.train("m1", 1) == [PollModelLater("m1", 3, 10.0)]

    model = steps.model()
    assert model.state is ModelState.TRAINING and model.train_calls == 1
    assert "train call outcome unknown" in model.history[-1]["detail"]
    model_status(upstream, "training")
    steps.clock.advance(10)
    assert steps.training.poll("m1", 3) == [PollModelLater("m1", 4, 10.0)]
    model_status(upstream, "ready")
    steps.clock.advance(10)
    assert steps.training.poll("m1", 4) == [SubmitLater("j1", 0.0, 1)]
    assert train.call_count == 1
    assert steps.model().state is ModelState.READY


def test_a_train_call_whose_worker_died_is_checked_not_made_again(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    _requested(steps)
    train = train_answer(upstream)
    # The claim as train() records it, then the worker died before any answer was recorded.
    steps.models.transition(
        "m1",
        [ModelState.REQUESTED],
        ModelState.REQUESTED,
        expect_gen=1,
        detail="train call",
        poll_gen=2,
        call_started_at=START,
        due_at=START + WINDOW,
    )
    assert steps.training.train("m1", 1) == []  # the redelivered message: stale

    steps.clock.advance(WINDOW + GRACE)
    actions, seen = steps.sweeper.sweep()
    assert actions == [TrainLater("m1", 0.0, 3)] and seen["model:requested"] == 1

    assert steps.training.train("m1", 3) == [PollModelLater("m1", 4, 10.0)]

    assert train.call_count == 0
    model = steps.model()
    assert model.state is ModelState.TRAINING
    assert "train call began but its answer was never recorded" in model.history[-1]["detail"]


def test_a_4xx_fails_the_model_and_its_parked_jobs_with_the_reason(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    _requested(steps, "j1")
    steps.image("j2", model_id="m1", callback=TASK)
    train = train_answer(upstream, status=400, json={"error": "bad training set"})

    assert steps.training.train("m1", 1) == [Notify("j2")]  # only j2 has a callback

    model = steps.model()
    assert model.state is ModelState.FAILED and model.parked == 0
    assert model.error == "train call refused: GET /models/m1/train: 400 bad training set"
    assert steps.model_due() is None
    for job_id in ("j1", "j2"):
        job = steps.job(job_id)
        assert job.state is JobState.FAILED and job.error == f"model m1 failed: {model.error}"
    assert steps.job("j2").callback_state == "pending"
    assert train.call_count == 1


# ---------------------------------------------------------------------------- poll


def test_ready_releases_every_parked_job_for_submission(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _training(steps, upstream, "j1", "j2")
    model_status(upstream, "queued")
    steps.clock.advance(10)
    (again,) = steps.training.poll("m1", gen)
    assert again == PollModelLater("m1", gen + 1, 10.0)
    assert (steps.model().checks, steps.model().upstream_status) == (1, "queued")
    model_status(upstream, "ready")
    steps.clock.advance(10)

    actions = steps.training.poll("m1", again.gen)

    assert sorted(actions, key=str) == [SubmitLater("j1", 0.0, 1), SubmitLater("j2", 0.0, 1)]
    model = steps.model()
    assert (model.state, model.checks, model.parked, model.ready_at) == (
        ModelState.READY,
        2,
        0,
        START + 20,
    )
    assert steps.model_due() is None
    for job_id in ("j1", "j2"):
        job = steps.job(job_id)
        assert job.state is JobState.PENDING and job.poll_gen == 1
    assert steps.training.poll("m1", again.gen) == []  # a duplicate: already ready
    assert calls_to(upstream, CHECK) == 2


def test_failed_upstream_fails_the_model_and_its_parked_jobs(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _training(steps, upstream, "j1")
    model_status(upstream, "FAILED", error="not enough images")
    steps.clock.advance(10)

    assert steps.training.poll("m1", gen) == []

    model = steps.model()
    assert model.state is ModelState.FAILED and model.checks == 1
    assert model.error == "training failed upstream: not enough images"
    job = steps.job("j1")
    assert job.state is JobState.FAILED
    assert job.error == "model m1 failed: training failed upstream: not enough images"


def test_a_check_is_never_scheduled_past_the_deadline_and_the_one_at_it_times_out(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _training(steps, upstream, "j1")
    check = model_status(upstream, "training")
    steps.clock.now = START + MODEL_DEADLINE - 4

    (last,) = steps.training.poll("m1", gen)
    assert isinstance(last, PollModelLater) and last.gen == gen + 1 and last.delay == pytest.approx(4.0)

    steps.clock.now = START + MODEL_DEADLINE
    assert steps.training.poll("m1", last.gen) == []

    assert check.call_count == 1  # the check at the deadline asks nothing
    model = steps.model()
    assert model.state is ModelState.TIMED_OUT and model.error == f"not ready within {MODEL_DEADLINE:.0f}s"
    assert steps.job("j1").state is JobState.FAILED
    assert steps.job("j1").error == f"model m1 timed_out: not ready within {MODEL_DEADLINE:.0f}s"


def test_a_throttled_check_waits_uncounted_under_a_new_generation(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _training(steps, upstream)
    check = model_status(upstream, "training")
    steps.block_upstream(20)

    (later,) = steps.training.poll("m1", gen)

    assert isinstance(later, PollModelLater) and later.gen == gen + 1 and 10 < later.delay <= 20
    model = steps.model()
    assert (model.state, model.errors_in_row, model.checks) == (ModelState.TRAINING, 0, 0)
    assert check.call_count == 0
    assert steps.training.poll("m1", gen) == []  # the old generation is stale


def test_transient_check_errors_back_off_reset_on_success_and_give_up_at_the_limit(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _training(steps, upstream, "j1")
    upstream.get(API + CHECK, status=502)

    (first,) = steps.training.poll("m1", gen)
    assert isinstance(first, PollModelLater) and 1.6 <= first.delay <= 2.4
    assert steps.model().errors_in_row == 1 and "502" in (steps.model().error or "")
    (second,) = steps.training.poll("m1", first.gen)
    assert isinstance(second, PollModelLater) and 3.2 <= second.delay <= 4.8
    assert steps.model().errors_in_row == 2

    model_status(upstream, "training")
    (fine,) = steps.training.poll("m1", second.gen)
    assert isinstance(fine, PollModelLater) and steps.model().errors_in_row == 0

    upstream.replace(responses.GET, API + CHECK, status=503)
    gen = fine.gen
    for _ in range(2):
        (action,) = steps.training.poll("m1", gen)
        gen = action.gen  # type: ignore[union-attr]
    assert steps.training.poll("m1", gen) == []

    model = steps.model()
    assert model.state is ModelState.FAILED
    assert (model.error or "").startswith("readiness check failed 3 times in a row")
    assert steps.job("j1").state is JobState.FAILED


def test_a_long_retry_after_on_a_check_is_held_for_the_sweeper(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _training(steps, upstream)
    upstream.get(API + CHECK, status=503, headers={"Retry-After": "300"})

    assert steps.training.poll("m1", gen) == []

    model = steps.model()
    assert model.poll_gen == gen + 1 and model.errors_in_row == 1
    assert steps.model_due() == START + 300
    steps.clock.advance(300)
    assert steps.sweeper.sweep()[0] == [PollModelLater("m1", gen + 2, 0.0)]
    assert steps.training.poll("m1", gen + 1) == []  # the generation the sweep superseded


def test_with_the_default_policy_the_first_check_is_held_not_a_countdown(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    default_model = type(steps.settings.poll).model_fields["model"].default
    steps.with_settings(poll={"model": default_model})
    _requested(steps)
    train_answer(upstream)

    assert steps.training.train("m1", 1) == []  # 300 s ± 5 %: over countdown_max

    model = steps.model()
    assert model.state is ModelState.TRAINING and model.poll_gen == 3
    due = steps.model_due()
    assert due is not None and START + 285 <= due <= START + 315


def test_a_stale_or_misplaced_poll_does_nothing(steps: Steps, upstream: responses.RequestsMock) -> None:
    _requested(steps)
    check = model_status(upstream, "ready")

    assert steps.training.poll("m1", 1) == []  # still requested: no check before the train call
    gen = _training_after_request(steps, upstream)
    assert steps.training.poll("m1", gen - 1) == []
    assert steps.training.poll("m1", gen + 1) == []
    assert steps.training.poll("unknown", 1) == []

    assert check.call_count == 0
    assert steps.model().state is ModelState.TRAINING and steps.model().poll_gen == gen


def _training_after_request(s: Steps, upstream: responses.RequestsMock) -> int:
    train_answer(upstream)
    (check,) = s.training.train("m1", 1)
    assert isinstance(check, PollModelLater)
    return check.gen


def test_force_retrains_a_ready_model_with_one_more_call(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _training(steps, upstream)
    model_status(upstream, "ready")
    steps.training.poll("m1", gen)
    assert steps.model().state is ModelState.READY
    steps.clock.advance(60)

    assert steps.training.request("m1") == 0  # ready, not forced: nothing to send
    new_gen = steps.training.request("m1", force=True)
    assert new_gen == steps.model().poll_gen == gen + 1
    assert steps.training.request("m1", force=True) == 0  # already requested again
    assert steps.image("j9", model_id="m1") is JobState.PARKED  # waits for the new training

    assert steps.training.train("m1", new_gen) == [PollModelLater("m1", new_gen + 2, 10.0)]
    assert calls_to(upstream, TRAIN) == 2
    model = steps.model()
    assert model.state is ModelState.TRAINING and model.train_calls == 2 and model.ready_at is None


def test_abandon_fails_training_and_its_parked_jobs(steps: Steps, upstream: responses.RequestsMock) -> None:
    gen = _training(steps, upstream, "j1")

    assert steps.training.abandon("m1", "poison") == []

    assert steps.model().state is ModelState.FAILED
    assert steps.job("j1").error == "model m1 failed: poison"
    assert steps.training.poll("m1", gen) == []
    assert steps.training.abandon("m1", "again") == []  # ended already
    assert steps.model().error == "poison"


def test_a_404_on_a_readiness_check_fails_the_model_at_once(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    gen = _training(steps, upstream, "j1")
    upstream.get(API + CHECK, status=404, json={"error": "no such model"})

    assert steps.training.poll("m1", gen) == []

    model = steps.model()
    assert model.state is ModelState.FAILED
    assert model.error == "readiness check refused: GET /models/m1: 404 no such model"
    assert steps.job("j1").state is JobState.FAILED


def test_no_train_call_is_made_once_the_deadline_has_passed(
    steps: Steps, upstream: responses.RequestsMock
) -> None:
    _requested(steps, "j1")
    train = train_answer(upstream)
    # Held back by the shared limiter (a 429's Retry-After can close it for up to an hour) until the
    # deadline has gone by; a throttle is not counted, so nothing gives up meanwhile.
    steps.block_upstream(30)
    (later,) = steps.training.train("m1", 1)
    assert isinstance(later, TrainLater)
    steps.unblock_upstream()
    steps.clock.now = START + MODEL_DEADLINE + 1

    actions = steps.training.train("m1", later.gen)

    assert train.call_count == 0  # made today, only for the model to time out at its first check
    assert actions == []
    assert steps.model().state is ModelState.TIMED_OUT
    assert steps.job("j1").state is JobState.FAILED
