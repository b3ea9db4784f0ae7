"""The sweeper's view of the submit queue (:class:`genq.backlog.SubmitBacklog`), read from real
messages a real producer put on a real Redis broker, and what the sweeper does with it: a pending job
whose submit message is still waiting in its lane's queue is not sent again (no worker runs here, so
every message waits)."""

from __future__ import annotations

import time

import pytest

from genq.backlog import SubmitBacklog
from genq.ledger import QueuedSince
from genq.schemas import JobState
from genq.services import Services
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def test_the_oldest_waiting_submit_of_each_lane_and_no_re_drive_while_it_waits(stack: Stack) -> None:
    backlog = SubmitBacklog(stack.ledger().redis)
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
    assert SubmitBacklog(None)() == QueuedSince()
