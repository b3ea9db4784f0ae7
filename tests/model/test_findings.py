"""The counterexamples of ``tests/model/FINDINGS.md`` as fixed step sequences through the same machine,
so each one can be replayed (and kept as a regression test) without hypothesis. Each fails at HEAD
d11bef6 with the named invariant and passes once its root cause is fixed."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from genq import keys
from genq.actions import SubmitLater
from genq.schemas import JobState
from tests.model.machine import UUIDS, GenqMachine, InvariantBroken, World
from tests.model.test_invariants import world  # noqa: F401  (the module's redis-server fixture)

pytestmark = pytest.mark.integration


@pytest.fixture
def m(world: World) -> Iterator[GenqMachine]:  # noqa: F811
    GenqMachine.world = world
    real_uuid4 = uuid.uuid4
    uuid.uuid4 = UUIDS  # type: ignore[assignment]
    quiet = logging.getLogger("genq")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield GenqMachine()
    finally:
        uuid.uuid4 = real_uuid4
        quiet.setLevel(level)


def first(m: GenqMachine, kind: str) -> int:
    """Index (the rules' ``pick``) of the first pending message of this action type."""
    for i, msg in enumerate(m.msgs):
        if type(msg.action).__name__ == kind:
            return i
    raise AssertionError(f"no {kind} pending: {[msg.action for msg in m.msgs]}")


def check(m: GenqMachine) -> None:
    m.step_invariants()


def finish(m: GenqMachine) -> None:
    m.step_invariants()
    m.teardown()


def test_f1_jobs_index_is_trimmed(m: GenqMachine) -> None:
    m.submit("image", 1, False, False, False, None)
    m.cancel(0)
    m.tick(4000.0)
    m.sweep()  # the sweep after the expiry trims the indexes
    check(m)
    assert m.redis.zcard(keys.JOBS) == 0


def test_f2_ambiguous_train_call_is_not_repeated(m: GenqMachine) -> None:
    m.train("m1", False)
    m.deliver(first(m, "TrainLater"), "timeout", 1.0, "success", 200.0)
    check(m)
    # No second train message: the model goes on to readiness checks, which tell whether it started.
    assert "TrainLater" not in [type(msg.action).__name__ for msg in m.msgs]
    m.sweep()
    m.tick(700.0)
    m.sweep()
    check(m)
    assert sum(t.acted for t in m.upstream.trains) == 1


def test_f3_racing_train_deliveries_call_once(m: GenqMachine) -> None:
    m.train("m1", False)
    m.tick(6.0)
    m.sweep()
    m.race(0, 0, "message", "ok")
    check(m)


def test_f4_throttled_training_does_not_multiply_chains(m: GenqMachine) -> None:
    m.train("m1", False)
    for _ in range(12):
        for _ in range(len(m.msgs)):
            m.deliver(0, "throttled", 1.0, "success", 200.0)
        check(m)
        m.tick(4.0)
        m.sweep()
        check(m)


def test_f5_sweeps_do_not_pile_up_submit_chains(m: GenqMachine) -> None:
    m.submit("image", 1, False, False, False, None)
    for _ in range(3):
        m.tick(6.0)
        m.sweep()
        check(m)


def test_f6_callback_outlives_the_record_ttl(m: GenqMachine) -> None:
    m.skip.add("I7")  # F1 would fail first
    m.submit("image", 1, False, True, False, None)
    m.cancel(0)
    m.tick(4000.0)
    finish(m)


def test_f7_resent_intake_request_does_not_resurrect_a_job(m: GenqMachine) -> None:
    m.submit("image", 1, False, False, True, None)
    m.tick(4000.0)
    m.skip.add("I7")  # F1 would fail first
    m.cancel(0)
    check(m)
    m.resend(0)
    check(m)


def test_f8_resubmit_reports_the_final_state(m: GenqMachine) -> None:
    m.submit("image", 1, False, True, False, None)
    m.crash(first(m, "SubmitLater"), 99, False, "timeout")
    check(m)
    m.resubmit(0)
    m.lose(first(m, "SubmitLater"))
    finish(m)


def test_f9_workflow_ends_after_a_lost_step_hook(m: GenqMachine) -> None:
    m.submit("workflow", 1, False, True, False, None)
    m.deliver(first(m, "SubmitLater"), "ok", 1.0, "success", 3.0)
    m.deliver(first(m, "PollLater"), "ok", 1.0, "success", 3.0)
    m.deliver(first(m, "PollLater"), "ok", 1.0, "success", 3.0)
    m.deliver(first(m, "Download"), "ok", 1.0, "success", 3.0)
    m.crash(first(m, "Finalize"), 2, False, "ok")
    finish(m)


def test_f10_known_upstream_job_is_never_posted_again(m: GenqMachine) -> None:
    m.submit("image", 1, False, False, False, None)
    m.race(0, 0, "slow", "ok")
    check(m)
    if m.records["image1"].state.value == "submit_unknown":
        m.resubmit(0)
        m.deliver(first(m, "SubmitLater"), "ok", 1.0, "success", 3.0)
    finish(m)


def test_findings_raise_the_invariant_error(m: GenqMachine) -> None:
    """The machine's failures are ``InvariantBroken`` (an AssertionError naming the invariant)."""
    with pytest.raises(InvariantBroken, match="I7"):
        m.fail("I7 indexes", "example")


def test_f11_a_delivered_callback_of_a_cancelled_job_survives_its_expiry(m: GenqMachine) -> None:
    m.submit("image", 1, False, True, True, None)
    m.cancel(0)
    m.deliver(first(m, "Notify"), "ok", 1.0, "success", 200.0)
    m.tick(4000.0)
    m.sweep()
    check(m)
    m.teardown()


def test_f12_a_callback_given_up_is_not_lost_when_its_record_expires(m: GenqMachine) -> None:
    m.submit("image", 1, False, True, False, None)
    m.cancel(0)
    for _ in range(3):  # callbacks.max_attempts: the third failure gives up (callback_failed)
        m.deliver(first(m, "Notify"), "404", 1.0, "success", 200.0)
    check(m)
    assert m.records["image1"].callback_state == "failed"
    m.tick(4000.0)  # the TTL starts once the callback is settled; the record expires
    m.sweep()
    check(m)
    m.teardown()


def test_f13_a_job_id_reborn_by_a_late_by_name_resend_is_paid_anew(m: GenqMachine) -> None:
    m.submit("image", 1, False, False, True, None)
    m.deliver(first(m, "SubmitLater"), "ok", 1.0, "success", 3.0)
    m.cancel(0)
    m.tick(4000.0)  # the intake key and the record both expire: genqueue has forgotten r1
    m.resend(0)  # the same derived id, a new job: its POST is not a second one of the first job
    m.deliver(first(m, "SubmitLater"), "ok", 1.0, "success", 3.0)
    check(m)


def test_f14_a_workflow_ends_when_its_step_record_expired_before_the_hook_ran(m: GenqMachine) -> None:
    m.submit("workflow", 1, False, True, False, None)
    # The generate step is refused (404): the step ends failed, then the worker dies before the
    # workflow's step-ended hook runs, and the redelivered message is lost too.
    m.crash(first(m, "SubmitLater"), 4, True, "404")
    m.lose(first(m, "SubmitLater"))
    m.tick(4000.0)  # no sweep for longer than the job TTL: the ended step's record expires
    m.sweep()
    finish(m)


def test_f15_a_job_left_submitting_gets_no_message_per_sweep(m: GenqMachine) -> None:
    m.submit("image", 1, False, False, False, None)
    # A worker took the submit, moved the job to submitting and died mid-POST; its message is gone.
    m.lose(first(m, "SubmitLater"))
    assert m.ledger.transition("image1", [JobState.PENDING], JobState.SUBMITTING, due_at=m.clock.now).ok
    for _ in range(5):  # sweeps while no message is delivered (a slow submit queue)
        m.tick(90.0)
        m.sweep()
        check(m)
    finish(m)


def test_a_queued_submit_is_not_sent_again_and_a_lost_one_is(m: GenqMachine) -> None:
    """Not a finding: the sweeper's backlog skip as the model runs it (the undelivered, due messages
    are the queue)."""
    m.submit("image", 1, False, False, False, None)
    m.tick(6.0)
    m.sweep()  # overdue, but its submit is still waiting: nothing sent again
    check(m)
    assert [msg.action for msg in m.msgs] == [SubmitLater("image1", 0.0, 0)]
    m.lose(0)
    m.tick(6.0)
    m.sweep()  # the queue holds nothing older: the message is lost, the job is re-driven
    check(m)
    assert [msg.action for msg in m.msgs] == [SubmitLater("image1", 0.0, 1)]
    finish(m)
