"""``Ledger.make_durable`` against a real primary and replica: WAIT is satisfied while the replica
keeps up and times out while it is stopped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from genq.errors import EnqueueError
from genq.ledger import Ledger
from genq.producer import Producer
from genq.schemas import JobKind
from tests.helpers import environment
from tests.redis_topologies import Replicated, replicated

pytestmark = pytest.mark.integration


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Replicated]:
    with replicated(tmp_path) as servers:
        yield servers


def test_make_durable_waits_for_the_replica(pair: Replicated) -> None:
    ledger = Ledger(pair.primary.client())
    ledger.create("job-1", JobKind.IMAGE, {"prompt": "x"}, expected_outputs=1)
    assert ledger.make_durable(1, 2.0) is True
    assert pair.replica.client().exists("genq:job:job-1")

    with pair.replica_paused():
        # Written on another connection: a bare WAIT on the ledger's connection, whose last write
        # (job-1) was acknowledged, would answer 1 at once. make_durable must cover it too.
        Ledger(pair.primary.client()).create("job-2", JobKind.IMAGE, {"prompt": "y"}, expected_outputs=1)
        started = time.monotonic()
        assert ledger.make_durable(1, 0.3) is False
        assert time.monotonic() - started >= 0.29
        assert ledger.make_durable(0, 0.3) is True  # no replica asked for: no wait at all

    assert ledger.make_durable(1, 2.0) is True  # caught up once it runs again
    assert ledger.make_durable(2, 0.2) is False  # there is only one


def test_a_producer_does_not_count_on_a_record_no_replica_has(pair: Replicated) -> None:
    """With durable replicas asked for, submit returns only once a replica has the job's record: a
    failover could otherwise lose a job whose id the caller already holds. Not yet: EnqueueError, and
    the same idempotency key later gives the same job."""
    env = {
        "GENQ_REDIS_URL": pair.primary.url,
        "GENQ_REDIS_DURABLE_REPLICAS": "1",
        "GENQ_REDIS_DURABLE_TIMEOUT": "0.3",
    }
    with environment(env):
        producer = Producer()
    try:
        with pair.replica_paused(), pytest.raises(EnqueueError, match="not yet on a replica"):
            producer.submit_image("a fox", num_images=1, idempotency_key="order-1")
        job = producer.submit_image("a fox", num_images=1, idempotency_key="order-1")
        assert not job.created  # the record the first try wrote, now on the replica too
        assert pair.replica.client().exists(f"genq:job:{job.id}")
    finally:
        producer.close()
