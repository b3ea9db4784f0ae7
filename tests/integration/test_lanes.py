"""Priority lanes end to end: real Redis broker, real worker processes, the simulator."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from genq import keys
from genq.intake import job_id_for
from genq.ledger import JobEvent
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
    # "Most": how many of the 60 it beats depends on the machine (a worker runs the batch polls that
    # came due before it took the job's message); a run at full load saw 42, quiet runs 45 and more.
    assert len(ended_after_it) > len(backlog) // 2


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


def test_submits_over_the_rate_wait_their_turn_in_redis_not_as_retries(stack: Stack) -> None:
    env = {
        "GENQ_LIMITS_TRIGGER_RATE": "4",
        "GENQ_BUDGETS_PRODUCERS": json.dumps({"nightly": {"lane": "batch"}}),
    }
    nightly = Producer(stack.settings(**env), producer_id="nightly")
    user = Producer(stack.settings(**env), producer_id="web")
    stack.producers += [nightly, user]
    stack.worker(concurrency=2, **env)
    backlog = [nightly.submit_image(f"backfill {i}", num_images=1).id for i in range(24)]
    queue = f"{keys.admit_prefix('trigger')}:q:batch:nightly"
    deadline = time.monotonic() + 60
    while nightly.ledger.redis.zcard(queue) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nightly.ledger.redis.zcard(queue) >= 8, "the backlog over the rate never queued"
    urgent = user.submit_image("someone is waiting", num_images=1).id

    records = wait_all(user, [*backlog, urgent], timeout=120)

    assert all(r.state is JobState.SUCCEEDED for r in records), [(r.state, r.error) for r in records]
    assert int(stack.sim.stats(include_jobs=False)["requests"]["POST /images/generation"]) == 25
    # Each job tried at most twice: refused once and queued (or queued at intake, behind the others),
    # then sent at its turn.
    tries = Counter(e.job_id for e in _events(user) if e.to_state == "submitting")
    assert max(tries.values()) <= 2 and len(tries) == 25, tries
    # The interactive job went ahead of the queued backlog: at most a turn or two after it came.
    by_id = {r.id: r for r in records}
    came, posted = by_id[urgent].created_at, by_id[urgent].submitted_at or 0
    batch = [by_id[i].submitted_at or 0 for i in backlog]
    assert sum(t < posted for t in batch) <= sum(t < came for t in batch) + 2


def test_a_backlog_over_the_rate_waits_in_redis_from_intake_not_in_the_broker(stack: Stack) -> None:
    env = {
        "GENQ_LIMITS_TRIGGER_RATE": "4",
        "GENQ_BUDGETS_PRODUCERS": json.dumps({"nightly": {"lane": "batch"}}),
    }
    nightly = Producer(stack.settings(**env), producer_id="nightly")
    stack.producers.append(nightly)
    stack.worker(concurrency=2, **env)
    first = [nightly.submit_image(f"backfill {i}", num_images=1).id for i in range(8)]
    queue = f"{keys.admit_prefix('trigger')}:q:batch:nightly"
    deadline = time.monotonic() + 60
    while not nightly.ledger.redis.exists(queue) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert nightly.ledger.redis.exists(queue), "the backlog over the rate never queued"

    later = [nightly.submit_image(f"backfill {i}", num_images=1).id for i in range(8, 20)]

    # Queued as they were recorded, with no submit message (one would have been tried, and refused).
    notes = [nightly.status(i).error or "" for i in later]
    assert all(n.startswith("waiting for its turn") for n in notes), notes
    records = wait_all(nightly, first + later, timeout=120)
    assert all(r.state is JobState.SUCCEEDED for r in records), [(r.state, r.error) for r in records]
    assert int(stack.sim.stats(include_jobs=False)["requests"]["POST /images/generation"]) == 20
    tries = Counter(e.job_id for e in _events(nightly) if e.to_state == "submitting")
    assert all(tries[i] == 1 for i in later), tries  # each tried once: at its turn


def _events(producer: Producer) -> list[JobEvent]:
    events, after = [], "0-0"
    while batch := producer.ledger.read_events(after, block_ms=1):
        events += batch
        after = batch[-1].stream_id
    return events
