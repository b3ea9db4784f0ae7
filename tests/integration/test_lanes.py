"""Priority lanes end to end: real Redis broker, real worker processes, the simulator."""

from __future__ import annotations

import json
import time

import pytest

from genq.intake import job_id_for
from genq.producer import Producer
from genq.schemas import JobState, Lane
from tests.helpers import Stack, wait_all

pytestmark = pytest.mark.integration


def test_an_interactive_job_goes_ahead_of_a_batch_backlog(stack: Stack) -> None:
    env = {"GENQ_BUDGETS_PRODUCERS": json.dumps({"nightly": {"lane": "batch"}})}
    nightly = Producer(stack.settings(**env), producer_id="nightly")
    user = Producer(stack.settings(**env), producer_id="web")
    stack.producers += [nightly, user]
    # The backlog is queued before any worker runs, the interactive job last of all.
    backlog = [nightly.submit_image(f"backfill {i}", num_images=1).id for i in range(60)]
    urgent = user.submit_image("someone is waiting", num_images=1).id
    stack.worker(concurrency=1, **env)

    records = wait_all(user, [*backlog, urgent], timeout=240)

    assert all(r.state is JobState.SUCCEEDED for r in records), [(r.state, r.error) for r in records]
    by_id = {r.id: r for r in records}
    assert by_id[urgent].lane is Lane.INTERACTIVE and by_id[backlog[0]].lane is Lane.BATCH
    order = sorted(records, key=lambda r: r.submitted_at or 0)
    # Its POST is among the first few (a worker may hold one batch message already), and its polls and
    # download went ahead too: it finished before most of the backlog did.
    assert [r.id for r in order].index(urgent) < 3
    ended_after_it = [r for r in records if (r.finished_at or 0) > (by_id[urgent].finished_at or 0)]
    assert len(ended_after_it) >= 45


def test_a_submit_can_override_its_producers_lane_and_intake_takes_it(stack: Stack) -> None:
    env = {"GENQ_BUDGETS_PRODUCERS": json.dumps({"nightly": {"lane": "batch"}})}
    stack.worker(concurrency=2, **env)
    nightly = Producer(stack.settings(**env), producer_id="nightly")
    stack.producers.append(nightly)
    rushed = nightly.submit_image("needed now", num_images=1, lane="interactive")
    flow = nightly.submit_workflow("a paper boat", num_images=1)
    nightly.celery.send_task(
        "genq.intake",
        args=[{"kind": "image", "prompt": "from go", "producer": "go-app", "lane": "batch"}, "req-1"],
        queue="submit",
    )
    deadline = time.monotonic() + 30
    while nightly.ledger.get(job_id_for("req-1")) is None and time.monotonic() < deadline:
        time.sleep(0.2)

    records = wait_all(nightly, [rushed.id, flow.id, job_id_for("req-1")], timeout=90)
    assert all(r.state is JobState.SUCCEEDED for r in records), [(r.state, r.error) for r in records]
    assert records[0].lane is Lane.INTERACTIVE
    assert (records[2].producer, records[2].lane) == ("go-app", Lane.BATCH)
    steps = [nightly.status(step) for step in records[1].children]
    assert len(steps) == 2 and all((s.producer, s.lane) == ("nightly", Lane.BATCH) for s in steps)
