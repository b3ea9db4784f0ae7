"""Every job kind, workflows, cancel, watch and the by-name intake, on real workers and the simulator."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from celery import Celery

from genq.intake import job_id_for
from genq.schemas import JobKind, JobState
from genq.simulator import Duration, SimConfig
from tests.helpers import FAST_POLL, Stack, wait_all

pytestmark = pytest.mark.integration
VIDEO_BYTES = 64 * 1024 * 1024


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(api_key="test-key-0d9f", images_per_job=2, video_duration=Duration(value=1.0))


def _fast(stack: Stack) -> dict[str, str]:
    return {"GENQ_POLL_UPSCALE": FAST_POLL, "GENQ_POLL_VIDEO": FAST_POLL}


def test_upscale_by_image_id_and_from_an_earlier_job(stack: Stack) -> None:
    stack.worker(**_fast(stack))
    producer = stack.producer(**_fast(stack))
    source = producer.submit_image("a castle", num_images=2).wait(timeout=30)

    by_id = producer.submit_upscale(image_id="img_external_1", factor=4)
    from_job = producer.submit_upscale(source_job=source.id, index=1)
    records = wait_all(producer, [by_id.id, from_job.id], timeout=30)

    assert [r.state for r in records] == [JobState.SUCCEEDED] * 2
    assert all(r.kind is JobKind.UPSCALE and len(r.outputs) == 1 for r in records)
    truth = stack.sim.job(records[1].upstream_id or "")
    assert truth["request"]["image_id"] == source.remote_ids[1]
    assert records[1].outputs[0].sha256 == truth["outputs"][0]["sha256"]


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_video_streams_with_bounded_worker_memory(stack: Stack) -> None:
    stack.sim.configure(video_bytes=VIDEO_BYTES)
    worker = stack.worker(queues=("submit", "poll", "download"), concurrency=1, **_fast(stack))
    (child,) = worker.children()
    producer = stack.producer(**_fast(stack))
    producer.submit_image("warm the pool child up").wait(timeout=30)  # imports and pools in place
    before = _peak_rss_kb(child)

    record = producer.submit_video("a river delta from above", duration=10).wait(timeout=60)

    (out,) = record.outputs
    assert out.bytes == VIDEO_BYTES and out.content_type == "video/mp4"
    truth = stack.sim.job(record.upstream_id or "")["outputs"][0]
    assert out.sha256 == truth["sha256"]
    growth_mb = (_peak_rss_kb(child) - before) / 1024
    # Buffering the file would add 64 MB; streaming in 256 KiB chunks adds next to nothing.
    assert growth_mb < 16, f"worker peak RSS grew {growth_mb:.1f} MB for a 64 MB download"


def test_workflow_generate_then_upscale_every_output(stack: Stack) -> None:
    stack.worker(**_fast(stack))
    producer = stack.producer(**_fast(stack))
    handle = producer.submit_workflow("a paper boat", num_images=2, upscale_factor=4)

    workflow = producer.wait(handle.id, timeout=60)

    assert workflow.kind is JobKind.WORKFLOW and workflow.state is JobState.SUCCEEDED
    steps = [producer.status(i) for i in workflow.children]
    assert [s.kind for s in steps] == [JobKind.IMAGE, JobKind.UPSCALE, JobKind.UPSCALE]
    assert all(s.parent_id == workflow.id and s.state is JobState.SUCCEEDED for s in steps)
    generated = steps[0]
    assert sorted(s.request["image_id"] for s in steps[1:]) == sorted(generated.remote_ids)
    assert all(s.request["factor"] == 4 for s in steps[1:])
    assert [o.sha256 for o in workflow.outputs] == [s.outputs[0].sha256 for s in steps[1:]]
    for out in workflow.outputs:
        assert hashlib.sha256(Path(out.path).read_bytes()).hexdigest() == out.sha256


def test_a_failed_step_fails_the_workflow_with_its_reason(stack: Stack) -> None:
    stack.worker()
    producer = stack.producer()
    handle = producer.submit_workflow("boom [sim:fail]")
    (workflow,) = wait_all(producer, [handle.id], timeout=30)
    assert workflow.state is JobState.FAILED
    assert "simulated failure" in (workflow.error or "") and "step image" in (workflow.error or "")


def test_cancel_during_polling_stops_upstream_calls(stack: Stack) -> None:
    stack.worker()
    producer = stack.producer()
    job = producer.submit_image("a long one [sim:duration=30]")
    deadline = time.monotonic() + 20
    while producer.status(job.id).polls < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    upstream_id = producer.status(job.id).upstream_id or ""

    assert producer.cancel(job.id) is True
    gets_at_cancel = stack.sim.stats()["per_job"][upstream_id]["gets"]
    time.sleep(3)  # several poll intervals (FAST_POLL: at most 1 s)

    record = producer.status(job.id)
    assert record.state is JobState.CANCELLED
    # One poll may already have been executing when the cancel landed; none starts after it.
    assert stack.sim.stats()["per_job"][upstream_id]["gets"] <= gets_at_cancel + 1
    assert producer.cancel(job.id) is False


def test_watch_yields_every_transition_until_the_end(stack: Stack) -> None:
    stack.worker()
    producer = stack.producer()
    job = producer.submit_image("watched")
    seen = [e.to_state for e in producer.watch([job.id], timeout=30)]
    assert seen[-1] == "succeeded"
    assert {"submitting", "submitted", "downloading"} <= set(seen)


def test_list_jobs_filters_by_state_and_kind(stack: Stack) -> None:
    stack.worker()
    producer = stack.producer()
    ok = producer.submit_image("fine")
    bad = producer.submit_image("bad [sim:fail]")
    wait_all(producer, [ok.id, bad.id], timeout=30)
    assert [r.id for r in producer.list_jobs(state="failed")] == [bad.id]
    assert {r.id for r in producer.list_jobs(kind="image")} == {ok.id, bad.id}
    assert producer.list_jobs(kind="video") == []


def test_a_non_python_producer_enqueues_by_task_name(stack: Stack) -> None:
    """Any Celery client: send ``genq.intake`` with the JSON request and its own request id."""
    stack.worker()
    client = Celery(broker=stack.env["GENQ_REDIS_URL"])
    request = {"kind": "image", "prompt": "from another app", "num_images": 2}
    client.send_task("genq.intake", args=[request, "order-77"], queue="submit")
    client.send_task("genq.intake", args=[request, "order-77"], queue="submit")  # resent: still one job
    client.send_task("genq.intake", args=[{"kind": "image", "num_images": 99}, "order-78"], queue="submit")
    producer = stack.producer()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            good, bad = producer.status(job_id_for("order-77")), producer.status(job_id_for("order-78"))
        except Exception:
            time.sleep(0.2)
            continue
        if good.terminal and bad.terminal:
            break
        time.sleep(0.2)
    assert good.state is JobState.SUCCEEDED and len(good.outputs) == 2
    assert (
        bad.state is JobState.FAILED and "prompt" in (bad.error or "") and "num_images" in (bad.error or "")
    )
    assert stack.sim.stats()["requests"]["POST /images/generation"] == 1
    client.close()
