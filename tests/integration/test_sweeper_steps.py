"""What one ``Sweeper.sweep()`` returns for each state it claims, against a real Redis with a fake
clock: the re-drive of lost messages, the dispatch of held waits, the growing push of idle claims,
``min_gap``, and the trimming of expired records from the indexes."""

from __future__ import annotations

from collections import Counter

import pytest

from genq import keys
from genq.actions import Download, Finalize, Notify, PollLater, PollModelLater, SubmitLater, TrainLater
from genq.intake import accept
from genq.ledger import QueuedSince
from genq.schemas import ImageRequest, JobKind, JobState, ModelState, OutputFile, WorkflowRequest
from tests.integration.steps import GRACE, MODEL_DEADLINE, START, Steps, shared_redis_fixture, steps_fixture  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration
TASK = {"task": "myapp.done", "queue": "myapp"}


def _overdue(s: Steps, seconds: float = GRACE) -> None:
    s.clock.advance(seconds)


def test_nothing_due_returns_nothing_and_marks_the_sweep(steps: Steps) -> None:
    steps.image("j1")

    assert steps.sweeper.sweep() == ([], Counter())

    assert steps.ledger.last_swept() == START
    assert steps.job("j1").poll_gen == 0


def test_a_pending_job_gets_a_submit_under_the_claims_new_generation(steps: Steps) -> None:
    steps.image("j1")
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    assert actions == [SubmitLater("j1", 0.0, 1)]
    assert seen == Counter({"pending": 1})
    assert steps.job("j1").poll_gen == 1  # the lost message's chain (gen 0) is stale now


def test_a_job_left_submitting_past_its_window_ends_unknown_in_the_sweep_itself(steps: Steps) -> None:
    steps.image("j1", callback=TASK)
    steps.ledger.transition("j1", [JobState.PENDING], JobState.SUBMITTING, due_at=START + 40)
    _overdue(steps, 40 + GRACE)

    actions, seen = steps.sweeper.sweep()

    # No submit message (one per sweep would pile up behind a slow queue): the sweep ends it, since
    # the POST may have gone out and is never made twice; the callback goes out with the ending.
    assert actions == [Notify("j1")] and seen == Counter({"submitting": 1})
    assert steps.job("j1").state is JobState.SUBMIT_UNKNOWN
    assert "stopped before recording" in (steps.job("j1").error or "")
    assert steps.jobs.submit("j1", 0) == []


def test_a_job_submitting_within_its_window_is_left_to_its_worker(steps: Steps) -> None:
    steps.image("j1")
    steps.ledger.transition("j1", [JobState.PENDING], JobState.SUBMITTING, due_at=START)
    _overdue(steps, GRACE)  # due (the clock of the due time ran ahead), but its POST began just now

    assert steps.sweeper.sweep()[0] == []
    assert steps.job("j1").state is JobState.SUBMITTING


def test_a_pending_job_whose_submit_is_still_queued_is_only_pushed_forward(steps: Steps) -> None:
    steps.image("j1")  # its submit message was sent at START
    steps.sweeper.backlog = lambda: QueuedSince(interactive=START - 30)  # an older one still waits
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    # A second message would only wait behind the first, and would make it stale: nothing is sent.
    assert actions == [] and seen == Counter()
    assert steps.job("j1").poll_gen == 0
    assert steps.redis.zscore(keys.DUE, "j1") == START + 2 * GRACE

    steps.sweeper.backlog = lambda: QueuedSince(interactive=START + 10)  # the queue moved past it: lost
    _overdue(steps)
    assert steps.sweeper.sweep()[0] == [SubmitLater("j1", 0.0, 1)]


def test_another_lanes_backlog_does_not_hold_back_a_re_drive(steps: Steps) -> None:
    steps.image("j1")  # interactive
    steps.sweeper.backlog = lambda: QueuedSince(batch=START - 30)
    _overdue(steps)

    assert steps.sweeper.sweep()[0] == [SubmitLater("j1", 0.0, 1)]


@pytest.mark.parametrize("state", [JobState.SUBMITTED, JobState.RUNNING])
def test_a_polled_job_gets_a_poll_under_a_new_generation(steps: Steps, state: JobState) -> None:
    steps.image("j1")
    steps.ledger.transition("j1", [JobState.PENDING], state, upstream_id="up1", poll_gen=4, due_at=START + 2)
    _overdue(steps, 2 + GRACE)

    actions, seen = steps.sweeper.sweep()

    assert actions == [PollLater("j1", 5, 0.0)] and seen == Counter({state.value: 1})
    assert steps.job("j1").poll_gen == 5
    assert steps.jobs.poll("j1", 4) == []  # the lost chain is stale


def test_a_poll_the_sweep_sent_that_is_still_queued_is_not_sent_again(steps: Steps) -> None:
    """A node behind on its polls: the poll the last claim sent still waits in the poll queue. A
    second would wait behind it and make it stale, so a long backlog would be spent on stale polls."""
    steps.image("j1")
    steps.ledger.transition(
        "j1", [JobState.PENDING], JobState.RUNNING, upstream_id="up1", poll_gen=4, due_at=START + 2
    )
    _overdue(steps, 2 + GRACE)
    assert steps.sweeper.sweep()[0] == [PollLater("j1", 5, 0.0)]  # sent at this claim
    claimed_at = steps.clock.now
    steps.sweeper.poll_backlog = lambda: QueuedSince(interactive=claimed_at - 5)  # older ones wait
    steps.sweeper.backlog = lambda: QueuedSince()  # (the submit queue's says nothing of polls)
    _overdue(steps, 10 * GRACE)

    actions, seen = steps.sweeper.sweep()

    assert actions == [] and seen == Counter()
    assert steps.job("j1").poll_gen == 5  # the waiting message stays the live one
    due = steps.due("j1")
    assert due is not None and due == steps.clock.now + GRACE

    # Sent by the claim, the message counts as sent up to a grace after it (the sweep sends the
    # others too), so a message sent 10 s after the claim may be behind it: still held back.
    steps.sweeper.poll_backlog = lambda: QueuedSince(interactive=claimed_at + 10)
    _overdue(steps)
    assert steps.sweeper.sweep()[0] == []
    # The queue moved past that (the message was taken, and lost): sent again.
    steps.sweeper.poll_backlog = lambda: QueuedSince(interactive=claimed_at + GRACE + 1)
    _overdue(steps)
    assert steps.sweeper.sweep()[0] == [PollLater("j1", 6, 0.0)]


def test_a_poll_queue_backlog_holds_back_neither_submits_nor_the_other_lane(steps: Steps) -> None:
    steps.image("p1")  # pending, its submit sent at START
    steps.image("j1")  # polled, interactive, its last poll sent at START
    steps.ledger.transition("j1", [JobState.PENDING], JobState.RUNNING, upstream_id="u", due_at=START + 2)
    steps.sweeper.poll_backlog = lambda: QueuedSince(batch=START - 30)
    _overdue(steps, 2 + GRACE)

    assert sorted(steps.sweeper.sweep()[0], key=str) == [PollLater("j1", 1, 0.0), SubmitLater("p1", 0.0, 1)]


def test_a_held_poll_is_dispatched_right_when_due_not_a_grace_later(steps: Steps) -> None:
    steps.image("j1")
    steps.ledger.transition(
        "j1",
        [JobState.PENDING],
        JobState.RUNNING,
        upstream_id="up1",
        poll_gen=2,
        due_at=START + 90,
        held=True,
    )
    steps.clock.now = START + 89.9
    assert steps.sweeper.sweep()[0] == []

    steps.clock.now = START + 90

    assert steps.sweeper.sweep()[0] == [PollLater("j1", 3, 0.0)]


def _held_poll(s: Steps, job_id: str, due: float, gen: int = 2) -> None:
    s.image(job_id)
    s.ledger.transition(
        job_id, [JobState.PENDING], JobState.RUNNING, upstream_id="up1", poll_gen=gen, due_at=due, held=True
    )


def test_a_held_poll_due_before_the_next_sweep_is_sent_now_with_a_countdown_to_it(steps: Steps) -> None:
    steps.sweeper.ahead = 2.0  # a 2 s look-ahead (the services' is two sweep intervals)
    _held_poll(steps, "j1", START + 90)
    steps.clock.now = START + 87.5
    assert steps.sweeper.sweep()[0] == []  # due after the next sweep: that one sends it

    steps.clock.now = START + 89

    actions, seen = steps.sweeper.sweep()

    # The worker's countdown runs it at its due time, not the first sweep after it (a second late).
    assert actions == [PollLater("j1", 3, 1.0)] and seen == Counter({"running": 1})
    assert steps.job("j1").poll_gen == 3  # one live chain: any other message of the job is stale now
    assert steps.jobs.poll("j1", 2) == []
    # The re-drive, if this message is lost, is counted from the due time, not from the claim.
    due = steps.due("j1")
    assert due is not None and due >= START + 90 + GRACE
    # The next sweeps (due time reached, passed) do not send it again.
    for now in (START + 89.5, START + 90, START + 91):
        steps.clock.now = now
        assert steps.sweeper.sweep()[0] == []


def test_every_delay_a_sweep_returns_counts_from_its_start(steps: Steps) -> None:
    """A sweep decides its delays, then the task sends them, taking off the time gone by since the
    sweep began (``genq.worker.tasks.dispatch``). A delay measured when its page was claimed would
    count twice the time the sweep spent before it, and make the last messages late by that much."""
    steps.sweeper.ahead = 2.0
    for i in range(5):
        _held_poll(steps, f"j{i}", START + 101 + 0.2 * i)
    steps.clock.now = START + 100
    clock = steps.sweeper.clock

    def slow() -> float:  # each reading later than the one before, as in a long sweep
        now = clock()
        steps.clock.advance(0.3)
        return now

    steps.sweeper.clock = slow
    actions, _ = steps.sweeper.sweep(batch=2)

    assert [(a.job_id, a.delay) for a in actions if isinstance(a, PollLater)] == [
        (f"j{i}", pytest.approx(1.0 + 0.2 * i)) for i in range(5)
    ]


def test_a_claim_returns_each_jobs_due_score(steps: Steps) -> None:
    _held_poll(steps, "early", START + 101)
    _held_poll(steps, "late", START + 50)
    steps.clock.now = START + 100

    claimed = steps.ledger.claim_due(ahead=2.0)

    assert [(c.id, c.state, c.gen, c.due) for c in claimed] == [
        ("late", JobState.RUNNING, 3, START + 50),
        ("early", JobState.RUNNING, 3, START + 101),
    ]
    steps.clock.now = START + 200
    _held_poll(steps, "overdue", START + 150)
    # Overdue (and the two above, claimed again): no countdown, as without the look-ahead.
    assert PollLater("overdue", 3, 0.0) in steps.sweeper.sweep()[0]


def test_a_held_submit_retry_due_before_the_next_sweep_gets_a_countdown(steps: Steps) -> None:
    steps.sweeper.ahead = 2.0
    steps.image("j1")
    steps.ledger.transition("j1", [JobState.PENDING], JobState.PENDING, due_at=START + 120, held=True)
    steps.clock.now = START + 118.5

    assert steps.sweeper.sweep()[0] == [SubmitLater("j1", 1.5, 1)]
    assert steps.job("j1").poll_gen == 1


def test_only_chained_states_are_claimed_before_they_are_due(steps: Steps) -> None:
    """A job submitting, downloading or parked, and a workflow, are claimed only once due: early,
    their step would run before its time (a POST window not over, a download still running)."""
    steps.sweeper.ahead = 2.0
    steps.image("sub")
    steps.ledger.transition("sub", [JobState.PENDING], JobState.SUBMITTING, due_at=START + 10, held=True)
    _downloading(steps, have=[], outputs=1)
    steps.ledger.transition("j1", [JobState.DOWNLOADING], JobState.DOWNLOADING, due_at=START + 10, held=True)
    made = accept(steps.ledger, _workflow_request(), job_id="w1")
    (step_id,) = made.to_submit
    steps.ledger.transition(
        step_id, [JobState.PENDING], JobState.RUNNING, upstream_id="u", due_at=START + 1e6
    )
    steps.ledger.transition("w1", [JobState.RUNNING], JobState.RUNNING, due_at=START + 10, held=True)
    steps.clock.now = START + 9

    assert steps.ledger.claim_due(ahead=2.0) == []
    assert steps.due("sub") == START + 10 and steps.due("j1") == START + 10 and steps.due("w1") == START + 10

    steps.clock.now = START + 10
    assert {c.id for c in steps.ledger.claim_due(ahead=2.0)} == {"sub", "j1", "w1"}


def test_jobs_not_claimed_early_do_not_hide_polls_behind_them(steps: Steps) -> None:
    """The look-ahead pages past what it leaves in place: a batch full of jobs not due yet still
    reaches the held polls due after them."""
    for i in range(5):
        steps.image(f"sub{i}")
        steps.ledger.transition(
            f"sub{i}", [JobState.PENDING], JobState.SUBMITTING, due_at=START + 10 + i / 10, held=True
        )
    _held_poll(steps, "p1", START + 11)
    steps.clock.now = START + 9.5

    claimed = steps.ledger.claim_due(limit=3, ahead=2.0)

    assert [c.id for c in claimed] == ["p1"]


def test_the_look_ahead_stays_below_half_the_grace(steps: Steps) -> None:
    _held_poll(steps, "j1", START + 100)
    steps.clock.now = START + 100 - GRACE / 2 - 1
    assert steps.ledger.claim_due(ahead=10 * GRACE) == []
    steps.clock.now = START + 100 - GRACE / 2
    assert [c.id for c in steps.ledger.claim_due(ahead=10 * GRACE)] == ["j1"]


def _downloading(s: Steps, have: list[int], outputs: int = 3) -> None:
    s.image("j1", outputs=outputs)
    s.ledger.set_urls("j1", {i: f"https://files.test/{i}.png" for i in range(outputs)})
    s.ledger.transition(
        "j1", [JobState.PENDING], JobState.DOWNLOADING, expected_outputs=outputs, due_at=START
    )
    for i in have:
        output = OutputFile(index=i, remote_id=f"r{i}", path=f"/x/{i}.png", bytes=1, sha256="0" * 64)
        s.ledger.record_output("j1", output)


def test_a_downloading_job_gets_the_missing_downloads(steps: Steps) -> None:
    _downloading(steps, have=[1])
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    assert actions == [Download("j1", 0), Download("j1", 2)] and seen == Counter({"downloading": 1})


def test_a_downloading_job_with_every_output_gets_finalize(steps: Steps) -> None:
    _downloading(steps, have=[0, 1], outputs=2)
    _overdue(steps)

    assert steps.sweeper.sweep()[0] == [Finalize("j1")]


def _parked(s: Steps) -> None:
    s.models.request("m1", deadline=MODEL_DEADLINE)
    assert s.image("j1", model_id="m1") is JobState.PARKED


def test_a_parked_job_whose_model_is_ready_is_released(steps: Steps) -> None:
    _parked(steps)
    # The model turned ready (its parked set emptied in the same step); the worker died before it
    # released the jobs it took off the model.
    moved, released = steps.models.transition("m1", [ModelState.REQUESTED], ModelState.READY, release=True)
    assert moved.ok and released == ["j1"]
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    assert actions == [SubmitLater("j1", 0.0, 1)] and seen == Counter({"parked": 1})
    assert steps.job("j1").state is JobState.PENDING


@pytest.mark.parametrize("ended", [ModelState.FAILED, ModelState.TIMED_OUT])
def test_a_parked_job_whose_model_ended_badly_fails_with_the_reason(steps: Steps, ended: ModelState) -> None:
    _parked(steps)
    steps.models.transition("m1", [ModelState.REQUESTED], ended, release=True, error="it broke")
    _overdue(steps)

    assert steps.sweeper.sweep()[0] == []

    job = steps.job("j1")
    assert job.state is JobState.FAILED and job.error == f"model m1 {ended.value}: it broke"
    assert steps.due("j1") is None


def test_a_parked_job_whose_model_is_unknown_is_released(steps: Steps) -> None:
    _parked(steps)
    steps.redis.delete(keys.model("m1"), keys.model_history("m1"))
    _overdue(steps)

    assert steps.sweeper.sweep()[0] == [SubmitLater("j1", 0.0, 1)]
    assert steps.job("j1").state is JobState.PENDING


def test_a_parked_job_whose_model_still_trains_stays_parked(steps: Steps) -> None:
    _parked(steps)
    steps.models.transition("m1", [ModelState.REQUESTED], ModelState.TRAINING, due_at=START + 10_000)
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    assert actions == [] and seen == Counter({"parked": 1})
    assert steps.job("j1").state is JobState.PARKED


def _workflow_request() -> WorkflowRequest:
    return WorkflowRequest(generate=ImageRequest(prompt="a boat", num_images=2))


def test_a_pending_workflow_is_resumed_and_its_first_step_submitted(steps: Steps) -> None:
    request = _workflow_request()
    # Redis failed right after the workflow record was written: no step, still pending.
    steps.ledger.create(
        "w1",
        JobKind.WORKFLOW,
        request.model_dump(mode="json", exclude_none=True),
        expected_outputs=2,
    )
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    workflow = steps.job("w1")
    assert workflow.state is JobState.RUNNING and len(workflow.children) == 1
    assert actions == [SubmitLater(workflow.children[0], 0.0)] and seen == Counter({"pending": 1})
    step = steps.job(workflow.children[0])
    assert step.kind is JobKind.IMAGE and step.parent_id == "w1" and step.state is JobState.PENDING


def test_a_running_workflow_whose_step_ended_unseen_is_resumed(steps: Steps) -> None:
    made = accept(steps.ledger, _workflow_request(), job_id="w1")
    (step_id,) = made.to_submit
    # The generate step succeeded; its worker died before the workflow hook ran.
    steps.ledger.transition(step_id, [JobState.PENDING], JobState.SUCCEEDED, remote_ids=["r0", "r1"])
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    workflow = steps.job("w1")
    upscales = workflow.children[1:]
    assert len(upscales) == 2
    assert sorted(actions, key=str) == sorted([SubmitLater(u, 0.0) for u in upscales], key=str)
    assert seen == Counter({"running": 1})
    assert steps.sweeper.sweep()[0] == []  # pushed forward: not claimed again right away


def test_a_running_workflow_with_its_step_still_running_gets_nothing(steps: Steps) -> None:
    made = accept(steps.ledger, _workflow_request(), job_id="w1")
    (step_id,) = made.to_submit
    steps.ledger.transition(
        step_id, [JobState.PENDING], JobState.RUNNING, upstream_id="u", due_at=START + 1e6
    )
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    assert actions == [] and seen == Counter({"running": 1})  # the workflow only, its step not due
    assert steps.job("w1").state is JobState.RUNNING


def test_models_requested_and_training_get_train_and_check_messages(steps: Steps) -> None:
    steps.models.request("m1", deadline=MODEL_DEADLINE)
    steps.models.request("m2", deadline=MODEL_DEADLINE)
    steps.models.transition("m2", [ModelState.REQUESTED], ModelState.TRAINING, poll_gen=6, due_at=START + 1)
    _overdue(steps, 1 + GRACE)

    actions, seen = steps.sweeper.sweep()

    assert sorted(actions, key=str) == sorted(
        [TrainLater("m1", 0.0, 2), PollModelLater("m2", 7, 0.0)], key=str
    )
    assert seen == Counter({"model:requested": 1, "model:training": 1})
    assert (steps.model("m1").poll_gen, steps.model("m2").poll_gen) == (2, 7)


def test_a_held_model_check_due_before_the_next_sweep_is_sent_with_a_countdown(steps: Steps) -> None:
    steps.sweeper.ahead = 2.0
    steps.models.request("m1", deadline=MODEL_DEADLINE)
    steps.models.transition(
        "m1", [ModelState.REQUESTED], ModelState.TRAINING, poll_gen=6, due_at=START + 300, held=True
    )
    steps.clock.now = START + 298.5

    assert steps.sweeper.sweep()[0] == [PollModelLater("m1", 7, 1.5)]
    steps.clock.now = START + 300
    assert steps.sweeper.sweep()[0] == []


def test_a_due_callback_gets_a_notify(steps: Steps) -> None:
    steps.image("j1", callback=TASK)
    steps.ledger.transition("j1", [JobState.PENDING], JobState.FAILED, error="x")
    assert steps.callback_due("j1") == START + GRACE
    _overdue(steps)

    actions, seen = steps.sweeper.sweep()

    assert actions == [Notify("j1")] and seen == Counter({"callback": 1})
    assert steps.sweeper.sweep()[0] == []  # pushed forward


def test_the_push_of_an_idle_claim_grows_up_to_ten_graces(steps: Steps) -> None:
    steps.image("j1")  # created (last moved) at START, due at START + GRACE
    pushes = []
    for _ in range(8):
        due = steps.due("j1")
        assert due is not None
        steps.clock.now = due
        actions, _ = steps.sweeper.sweep()
        assert len(actions) == 1
        new_due = steps.due("j1")
        assert new_due is not None
        pushes.append(new_due - due)

    # Each push is the time since the job last moved, at least one grace and at most ten.
    assert pushes == [g * GRACE for g in (1, 2, 4, 8, 10, 10, 10, 10)]


def test_a_claim_of_a_job_that_just_moved_is_pushed_by_one_grace(steps: Steps) -> None:
    steps.image("j1")
    steps.clock.now = START + 1000
    steps.ledger.transition("j1", [JobState.PENDING], JobState.PENDING, due_at=START + 1000 - GRACE)

    steps.sweeper.sweep()

    assert steps.due("j1") == START + 1000 + GRACE


def test_min_gap_lets_one_sweep_run_and_a_second_right_after_does_nothing(steps: Steps) -> None:
    steps.image("j1")
    steps.image("j2")
    _overdue(steps)

    first, seen = steps.sweeper.sweep(min_gap=30)
    steps.clock.advance(10_000)  # everything due again, by the fake clock
    second = steps.sweeper.sweep(min_gap=30)

    assert len(first) == 2 and seen == Counter({"pending": 2})
    assert second == ([], Counter())
    assert steps.ledger.last_swept() == START + GRACE  # the skipped sweep did not mark
    steps.redis.delete(keys.SWEEP_LOCK)  # the gap has passed
    assert len(steps.sweeper.sweep(min_gap=30)[0]) == 2


def test_batches_claim_everything_due(steps: Steps) -> None:
    for i in range(7):
        steps.image(f"j{i}")
    _overdue(steps)

    actions, seen = steps.sweeper.sweep(batch=3)

    assert sorted(a.job_id for a in actions) == [f"j{i}" for i in range(7)]  # type: ignore[union-attr]
    assert seen == Counter({"pending": 7})


def test_trim_drops_expired_records_from_every_index(steps: Steps) -> None:
    ttl = steps.ledger.job_ttl
    steps.image("gone", callback=TASK)
    steps.image("kept")
    steps.ledger.transition("gone", [JobState.PENDING], JobState.FAILED, error="x")
    steps.ledger.transition("kept", [JobState.PENDING], JobState.FAILED, error="x")
    assert steps.callback_due("gone") is not None
    # An ended record keeps living while its callback is due; settled, its TTL starts.
    assert steps.redis.ttl(keys.job("gone")) == -1
    steps.ledger.callback_attempted("gone", state="failed", attempts=6, error="x", retry_at=None)
    assert steps.redis.ttl(keys.job("gone")) > 0
    steps.redis.delete(keys.job("gone"))  # its TTL ran out (the fake clock cannot make Redis expire it)
    steps.clock.now = START + ttl

    actions, seen = steps.sweeper.sweep()

    assert actions == [] and seen["expired"] == 1
    assert steps.ledger.list_ids() == ["kept"]
    assert steps.callback_due("gone") is None and steps.due("gone") is None
    assert steps.redis.zscore(keys.EXPIRING, "gone") is None
    # Not expired yet in Redis: looked at again a minute later.
    assert steps.redis.zscore(keys.EXPIRING, "kept") == START + ttl + 60
    assert steps.ledger.trim() == 0
