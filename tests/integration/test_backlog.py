"""The sweeper's view of the submit and poll queues (:class:`genq.backlog.QueueBacklog`), read from
real messages a real producer or sweep put on a real Redis broker, and what the sweeper does with it:
a job whose submit or poll message is still waiting in its lane's queue is not sent again (no worker
runs here, so every message waits)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from genq import keys
from genq.actions import PollLater
from genq.backlog import QueueBacklog
from genq.celeryconf import POLL, Task
from genq.ledger import QueuedSince
from genq.metrics import sent_at_header
from genq.schemas import JobKind, JobState
from genq.services import Services
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def test_the_oldest_waiting_submit_of_each_lane_and_no_re_drive_while_it_waits(stack: Stack) -> None:
    backlog = QueueBacklog(stack.ledger().redis)
    assert backlog() == QueuedSince()  # nothing waiting

    before = time.time()
    producer = stack.producer(GENQ_WORKER_SWEEP_GRACE="0.5")
    first = producer.submit_image("waits in the interactive lane")
    producer.submit_image("waits in the batch lane", lane="batch")
    producer.submit_image("a newer interactive one")
    seen = backlog()
    assert seen.interactive is not None and seen.batch is not None
    assert before <= seen.interactive <= seen.batch <= time.time()  # the oldest of each lane's list

    services = Services.build(stack.settings(GENQ_WORKER_SWEEP_GRACE="0.5"))
    try:
        time.sleep(1.0)  # every job is overdue by the grace: a sweep would re-drive a lost message
        actions, counts = services.sweeper.sweep()
        assert actions == [] and not counts, (actions, counts)
        assert services.ledger.get(first.id).poll_gen == 0  # type: ignore[union-attr]
        assert services.ledger.get(first.id).state is JobState.PENDING  # type: ignore[union-attr]
    finally:
        services.close()


def test_a_broker_that_is_not_redis_is_an_unknown_backlog() -> None:
    assert QueueBacklog(None)() == QueuedSince()
    assert QueueBacklog(None, POLL)() == QueuedSince()


def test_a_poll_the_sweep_sent_is_not_sent_again_while_it_waits(stack: Stack) -> None:
    """The sweep's own messages, as the poll queue's backlog: overdue again (ten graces later), a job
    whose poll still waits in the queue gets no second one; once the queue is gone (the message lost),
    it does."""
    settings = stack.settings(GENQ_WORKER_SWEEP_GRACE="0.5")
    services = Services.build(settings)
    try:
        ledger = services.ledger
        ledger.create("j1", JobKind.IMAGE, {"prompt": "polled"}, expected_outputs=1)
        ledger.transition(
            "j1", [JobState.PENDING], JobState.RUNNING, upstream_id="u1", poll_gen=1, due_at=0.0
        )
        assert services.sweeper.sweep()[0] == [PollLater("j1", 2, 0.0)]
        # Sent as the worker sends it (stamped when sent), to a poll queue no worker reads.
        producer = stack.producer()
        producer.celery.send_task(Task.POLL, args=["j1", 2], queue=POLL, headers=sent_at_header())
        waiting = QueueBacklog(ledger.redis, POLL)()
        assert waiting.interactive is not None and waiting.batch is None

        ledger.redis.zadd(keys.DUE, {"j1": 0.0})  # overdue again, long since
        assert services.sweeper.sweep() == ([], Counter())
        assert ledger.get("j1").poll_gen == 2  # type: ignore[union-attr]

        ledger.redis.delete(POLL)  # the message is lost
        ledger.redis.zadd(keys.DUE, {"j1": 0.0})
        assert services.sweeper.sweep()[0] == [PollLater("j1", 3, 0.0)]
    finally:
        services.close()
