"""WorkflowService step by step against a real Redis with a fake clock: the upscales the generate step
starts (once each), how the workflow ends, and resume after a lost hook or a half-made workflow."""

from __future__ import annotations

import pytest

from genq.actions import Notify, SubmitLater
from genq.intake import accept
from genq.schemas import ImageRequest, JobKind, JobState, OutputFile, WorkflowRequest
from tests.integration.steps import Steps, shared_redis_fixture, steps_fixture  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration
TASK = {"task": "myapp.on_done", "queue": "myapp"}


def _workflow(s: Steps, images: int = 2, callback: dict[str, str] | None = None) -> str:
    """A running workflow; returns its generate step's id."""
    request = WorkflowRequest.model_validate(
        {"generate": {"prompt": "a boat", "num_images": images}, "upscale_factor": 4, "callback": callback}
    )
    made = accept(s.ledger, request, job_id="w1")
    assert made.created and made.state is JobState.RUNNING
    (step_id,) = made.to_submit
    return step_id


def _succeed(s: Steps, job_id: str, remote_ids: list[str], outputs: int = 0) -> None:
    for i in range(outputs):
        out = OutputFile(
            index=i, remote_id=f"{job_id}-o{i}", path=f"/dl/{job_id}/{i}.png", bytes=1, sha256="0" * 64
        )
        s.ledger.set_fields(job_id, **{f"out:{i:04d}": out.model_dump_json()})
    live = [st for st in JobState if not st.terminal]
    assert s.ledger.transition(job_id, live, JobState.SUCCEEDED, remote_ids=remote_ids, error=None).ok


def _fail(s: Steps, job_id: str, reason: str) -> None:
    live = [st for st in JobState if not st.terminal]
    assert s.ledger.transition(job_id, live, JobState.FAILED, error=reason).ok


def _upscales(s: Steps) -> list[str]:
    return s.job("w1").children[1:]


def test_the_generate_step_starts_one_upscale_per_output(steps: Steps) -> None:
    generate = _workflow(steps)
    _succeed(steps, generate, ["img-a", "img-b"])

    actions = steps.workflows.step_ended(steps.job(generate))

    workflow = steps.job("w1")
    assert workflow.state is JobState.RUNNING and workflow.children[0] == generate
    upscales = workflow.children[1:]
    assert len(upscales) == 2
    assert actions == [SubmitLater(u, 0.0) for u in upscales]
    for upscale_id, image_id in zip(upscales, ["img-a", "img-b"], strict=True):
        job = steps.job(upscale_id)
        assert (job.kind, job.state, job.parent_id) == (JobKind.UPSCALE, JobState.PENDING, "w1")
        assert job.request == {"image_id": image_id, "factor": 4}


def test_a_second_step_ended_of_the_generate_step_starts_nothing_twice(steps: Steps) -> None:
    generate = _workflow(steps)
    _succeed(steps, generate, ["img-a", "img-b"])
    first = steps.workflows.step_ended(steps.job(generate))

    assert steps.workflows.step_ended(steps.job(generate)) == []

    assert len(first) == 2
    assert steps.job("w1").children == [generate, *(a.job_id for a in first)]  # type: ignore[union-attr]
    assert len(steps.ledger.list_ids()) == 1 + 1 + 2


def test_the_workflow_succeeds_when_every_step_has(steps: Steps) -> None:
    generate = _workflow(steps, callback=TASK)
    _succeed(steps, generate, ["img-a", "img-b"])
    steps.workflows.step_ended(steps.job(generate))
    first, second = _upscales(steps)
    _succeed(steps, second, ["up-b"], outputs=1)

    assert steps.workflows.step_ended(steps.job(second)) == []  # the first upscale still runs
    assert steps.job("w1").state is JobState.RUNNING

    _succeed(steps, first, ["up-a"], outputs=1)
    assert steps.workflows.step_ended(steps.job(first)) == [Notify("w1")]

    workflow = steps.job("w1")
    assert workflow.state is JobState.SUCCEEDED and workflow.error is None
    assert workflow.callback_state == "pending"
    # The upscaled files, numbered in step order.
    assert [(o.index, o.remote_id) for o in workflow.outputs] == [(0, f"{first}-o0"), (1, f"{second}-o0")]
    assert steps.workflows.step_ended(steps.job(first)) == []  # ended already: no second Notify


def test_a_failed_generate_step_fails_the_workflow_with_its_reason(steps: Steps) -> None:
    generate = _workflow(steps, callback=TASK)
    _fail(steps, generate, "upstream job failed: nsfw")

    assert steps.workflows.step_ended(steps.job(generate)) == [Notify("w1")]

    workflow = steps.job("w1")
    assert workflow.state is JobState.FAILED
    assert workflow.error == f"step image {generate} ended failed: upstream job failed: nsfw"
    assert workflow.children == [generate]  # no upscale started


def test_the_first_failed_step_gives_the_workflows_reason(steps: Steps) -> None:
    generate = _workflow(steps)
    _succeed(steps, generate, ["img-a", "img-b"])
    steps.workflows.step_ended(steps.job(generate))
    first, second = _upscales(steps)
    steps.ledger.transition(second, [JobState.PENDING], JobState.TIMED_OUT, error="no result within 900s")

    assert steps.workflows.step_ended(steps.job(second)) == []  # no callback

    _fail(steps, first, "later failure")
    assert steps.workflows.step_ended(steps.job(first)) == []
    workflow = steps.job("w1")
    assert workflow.state is JobState.FAILED
    assert workflow.error == f"step upscale {second} ended timed_out: no result within 900s"


def test_a_step_of_an_ended_workflow_or_no_workflow_changes_nothing(steps: Steps) -> None:
    generate = _workflow(steps)
    assert steps.ledger.transition("w1", [JobState.RUNNING], JobState.CANCELLED, error="cancelled").ok
    _succeed(steps, generate, ["img-a"])

    assert steps.workflows.step_ended(steps.job(generate)) == []
    assert steps.job("w1").children == [generate]

    steps.image("lone")
    _succeed(steps, "lone", ["x"])
    assert steps.workflows.step_ended(steps.job("lone")) == []


def test_resume_of_a_pending_workflow_makes_its_first_step_once(steps: Steps) -> None:
    request = WorkflowRequest(generate=ImageRequest(prompt="a boat", num_images=1))
    # Redis failed right after the workflow record was written.
    steps.ledger.create(
        "w1", JobKind.WORKFLOW, request.model_dump(mode="json", exclude_none=True), expected_outputs=1
    )

    (submit,) = steps.workflows.resume(steps.job("w1"))

    workflow = steps.job("w1")
    assert workflow.state is JobState.RUNNING and len(workflow.children) == 1
    assert submit == SubmitLater(workflow.children[0], 0.0)
    assert steps.job(workflow.children[0]).parent_id == "w1"
    assert steps.workflows.resume(steps.job("w1")) == []  # running, its step not ended: nothing
    assert len(steps.ledger.list_ids()) == 2


def test_resume_of_a_running_workflow_after_a_lost_hook_starts_the_upscales(steps: Steps) -> None:
    generate = _workflow(steps)
    _succeed(steps, generate, ["img-a", "img-b"])  # the hook never ran

    actions = steps.workflows.resume(steps.job("w1"))

    assert actions == [SubmitLater(u, 0.0) for u in _upscales(steps)] and len(actions) == 2
    assert steps.workflows.resume(steps.job("w1")) == []  # idempotent


def test_resume_of_a_running_workflow_whose_last_step_ended_unseen_ends_it(steps: Steps) -> None:
    generate = _workflow(steps, images=1, callback=TASK)
    _succeed(steps, generate, ["img-a"])
    steps.workflows.step_ended(steps.job(generate))
    (upscale,) = _upscales(steps)
    _succeed(steps, upscale, ["up-a"], outputs=1)  # the hook never ran

    assert steps.workflows.resume(steps.job("w1")) == [Notify("w1")]

    assert steps.job("w1").state is JobState.SUCCEEDED
    assert steps.workflows.resume(steps.job("w1")) == []


def test_resume_of_a_running_workflow_whose_generate_step_failed_ends_it(steps: Steps) -> None:
    generate = _workflow(steps)
    _fail(steps, generate, "boom")

    assert steps.workflows.resume(steps.job("w1")) == []

    assert steps.job("w1").state is JobState.FAILED and "boom" in (steps.job("w1").error or "")


def test_a_step_ending_through_the_job_service_drives_the_workflow(steps: Steps) -> None:
    generate = _workflow(steps, callback=TASK)
    steps.ledger.transition(generate, [JobState.PENDING], JobState.RUNNING, upstream_id="up1")

    assert steps.jobs.abandon(generate, "poison message") == [Notify("w1")]

    assert steps.job(generate).state is JobState.FAILED
    assert steps.job("w1").error == f"step image {generate} ended failed: poison message"
