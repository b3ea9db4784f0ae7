"""ModelLedger against a real Redis with a fake clock: requests, compare-and-set transitions, the
release of parked jobs in the same step, the due index the sweeper claims from, and the history."""

from __future__ import annotations

import pytest

from genq import keys
from genq.schemas import JobState, ModelState
from tests.integration.steps import GRACE, MODEL_DEADLINE, START, Steps, shared_redis_fixture, steps_fixture  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def _request(s: Steps, model_id: str = "m1", force: bool = False) -> int:
    return s.models.request(model_id, deadline=MODEL_DEADLINE, force=force)


def _to(s: Steps, to: ModelState, model_id: str = "m1", **kwargs: object) -> bool:
    allowed = [ModelState.REQUESTED, ModelState.TRAINING]
    moved, _ = s.models.transition(model_id, allowed, to, **kwargs)  # type: ignore[arg-type]
    return moved.ok


def test_a_first_request_records_the_model_and_returns_generation_one(steps: Steps) -> None:
    assert _request(steps) == 1

    model = steps.model()
    assert model.state is ModelState.REQUESTED and model.poll_gen == 1
    assert model.requested_at == START and model.deadline_at == START + MODEL_DEADLINE
    assert model.call_started_at is None and model.checks == 0 and model.errors_in_row == 0
    assert steps.model_due() == START + GRACE  # re-driven if the train message never runs
    assert steps.models.list_ids() == ["m1"]
    assert [(e["event"], e["from"]) for e in model.history] == [("requested", "untrained")]


@pytest.mark.parametrize("state", [ModelState.REQUESTED, ModelState.TRAINING, ModelState.READY])
def test_a_request_under_way_or_done_returns_zero_and_changes_nothing(
    steps: Steps, state: ModelState
) -> None:
    _request(steps)
    if state is not ModelState.REQUESTED:
        assert _to(steps, state)
    before = steps.model()
    steps.clock.advance(5)

    assert _request(steps) == 0

    after = steps.model()
    assert (after.state, after.poll_gen, after.requested_at) == (state, before.poll_gen, START)
    assert len(after.history) == len(before.history)


def test_force_requests_a_ready_model_again_with_a_new_generation(steps: Steps) -> None:
    _request(steps)
    assert _to(steps, ModelState.READY, poll_gen=4, ready_at=START + 1)
    steps.clock.advance(100)

    assert _request(steps, force=True) == 5

    model = steps.model()
    assert model.state is ModelState.REQUESTED and model.ready_at is None
    assert model.requested_at == START + 100 and model.deadline_at == START + 100 + MODEL_DEADLINE
    assert steps.model_due() == START + 100 + GRACE
    assert model.history[-1]["event"] == "requested" and model.history[-1]["from"] == "ready"


@pytest.mark.parametrize("ended", [ModelState.FAILED, ModelState.TIMED_OUT])
def test_a_request_after_a_failure_starts_afresh_without_force(steps: Steps, ended: ModelState) -> None:
    _request(steps)
    assert _to(steps, ModelState.TRAINING, checks=3, errors_in_row=2, call_started_at=START, started_at=START)
    assert _to(steps, ended, error="it broke")

    gen = _request(steps)

    model = steps.model()
    assert gen == model.poll_gen == 2
    assert model.state is ModelState.REQUESTED
    assert (model.error, model.errors_in_row, model.checks) == (None, 0, 0)
    assert model.call_started_at is None and model.started_at is None  # a new train call may be made


def test_transition_is_a_compare_and_set_on_state_and_generation(steps: Steps) -> None:
    _request(steps)
    steps.clock.advance(3)

    wrong_state, _ = steps.models.transition("m1", [ModelState.TRAINING], ModelState.READY)
    stale, _ = steps.models.transition(
        "m1", [ModelState.REQUESTED], ModelState.TRAINING, expect_gen=7, poll_gen=8
    )
    missing, _ = steps.models.transition("nope", [ModelState.REQUESTED], ModelState.TRAINING)
    assert (wrong_state.ok, wrong_state.reason) == (False, "state")
    assert (stale.ok, stale.reason) == (False, "stale")
    assert (missing.ok, missing.reason) == (False, "missing")
    assert steps.model().state is ModelState.REQUESTED and steps.model().poll_gen == 1
    assert steps.models.get("nope") is None

    moved, released = steps.models.transition(
        "m1", [ModelState.REQUESTED], ModelState.TRAINING, expect_gen=1, detail="go", poll_gen=2, checks=1
    )

    assert (moved.ok, moved.reason, released) == (True, "ok", [])
    model = steps.model()
    assert (model.state, model.poll_gen, model.checks, model.updated_at) == (
        ModelState.TRAINING,
        2,
        1,
        START + 3,
    )
    assert model.history[-1] == {"at": START + 3, "event": "training", "detail": "go"}


def test_release_empties_the_parked_set_in_the_same_step(steps: Steps) -> None:
    _request(steps)
    assert steps.image("j1", model_id="m1") is JobState.PARKED
    assert steps.image("j2", model_id="m1") is JobState.PARKED
    assert steps.model().parked == 2

    # A move without release leaves them parked.
    assert steps.models.transition("m1", [ModelState.REQUESTED], ModelState.TRAINING)[1] == []
    assert steps.model().parked == 2

    moved, released = steps.models.transition("m1", [ModelState.TRAINING], ModelState.READY, release=True)

    assert moved.ok and sorted(released) == ["j1", "j2"]
    assert steps.model().parked == 0 and not steps.redis.exists(keys.model_parked("m1"))
    assert steps.image("j3", model_id="m1") is JobState.PENDING  # a ready model parks nothing


def test_a_refused_transition_releases_nothing(steps: Steps) -> None:
    _request(steps)
    steps.image("j1", model_id="m1")

    moved, released = steps.models.transition("m1", [ModelState.TRAINING], ModelState.FAILED, release=True)

    assert not moved.ok and released == []
    assert steps.model().parked == 1


def test_the_due_index_follows_the_transitions(steps: Steps) -> None:
    _request(steps)

    _to(steps, ModelState.TRAINING, due_at=START + 10)
    assert steps.model_due() == START + 10 + GRACE  # a countdown: re-driven a grace after
    _to(steps, ModelState.TRAINING, due_at=START + 300, held=True)
    assert steps.model_due() == START + 300  # held in Redis: dispatched right when due
    _to(steps, ModelState.TRAINING, checks=1)
    assert steps.model_due() == START + 300  # no due_at: kept
    _to(steps, ModelState.READY, due_at=START + 999)
    assert steps.model_due() is None  # no longer in progress: gone, whatever due_at says


def test_claim_due_bumps_the_generation_and_pushes_the_claim_forward(steps: Steps) -> None:
    _request(steps, "m1")
    _request(steps, "m2")
    _to(steps, ModelState.TRAINING, "m2", poll_gen=5)
    _request(steps, "m3")
    _to(steps, ModelState.READY, "m3")
    assert steps.models.claim_due() == []  # nothing due yet

    steps.clock.advance(GRACE)
    claimed = sorted(steps.models.claim_due())

    assert claimed == [
        ("m1", ModelState.REQUESTED, 2, START + GRACE),
        ("m2", ModelState.TRAINING, 6, START + GRACE),
    ]
    assert (steps.model("m1").poll_gen, steps.model("m2").poll_gen, steps.model("m3").poll_gen) == (2, 6, 1)
    assert steps.model_due("m1") == START + 2 * GRACE
    assert steps.models.claim_due() == []  # pushed forward: the next sweep does not claim them again


def test_a_model_check_due_within_the_look_ahead_is_claimed_with_its_due_time(steps: Steps) -> None:
    _request(steps, "m1")
    _to(steps, ModelState.TRAINING, "m1", poll_gen=5, due_at=START + 300, held=True)
    steps.clock.now = START + 298.5
    assert steps.models.claim_due() == []

    assert steps.models.claim_due(ahead=2.0) == [("m1", ModelState.TRAINING, 6, START + 300)]
    due = steps.model_due("m1")
    assert due is not None and due >= START + 300 + GRACE  # the grace runs from the due time
    assert steps.models.claim_due(ahead=2.0) == []


def test_claim_due_drops_a_model_whose_record_is_gone(steps: Steps) -> None:
    _request(steps)
    steps.redis.delete(keys.model("m1"))
    steps.clock.advance(GRACE)

    assert steps.models.claim_due() == []
    assert steps.model_due() is None


def test_history_keeps_every_change_and_notes_in_order(steps: Steps) -> None:
    _request(steps)
    steps.clock.advance(1)
    steps.models.transition("m1", [ModelState.REQUESTED], ModelState.REQUESTED, detail="train call")
    steps.clock.advance(1)
    steps.models.transition("m1", [ModelState.REQUESTED], ModelState.TRAINING, detail="accepted")
    steps.models.note("m1", "check", status="queued")
    steps.clock.advance(1)
    steps.models.transition("m1", [ModelState.TRAINING], ModelState.READY, detail="ready")
    steps.models.transition("m1", [ModelState.TRAINING], ModelState.FAILED, detail="refused")  # not logged

    history = steps.model().history
    assert [(e["at"] - START, e["event"], e.get("detail")) for e in history] == [
        (0, "requested", None),
        (1, "requested", "train call"),
        (2, "training", "accepted"),
        (2, "check", None),
        (3, "ready", "ready"),
    ]
    assert history[3]["status"] == "queued"
    last_two = steps.models.get("m1", history=2)
    assert last_two is not None and [e["event"] for e in last_two.history] == ["check", "ready"]
