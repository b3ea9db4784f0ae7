"""Redis Sentinel, for real: a primary, a replica and three sentinels, all with passwords. A worker
runs jobs through it; then the primary is killed, the sentinels promote the replica, and jobs submitted
after the failover complete too (the ledger, the broker and the producer follow the new primary)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from genq.embedded import EmbeddedRedis
from tests.conftest import Stack, wait_all
from tests.redis_topologies import SentinelSet, sentinel_set

pytestmark = pytest.mark.integration

MASTER_PASSWORD = "primary-pw-CANARY-41"
SENTINEL_PASSWORD = "sentinel-pw-CANARY-97"


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    with sentinel_set(
        tmp_path / "sentinel-set", master_password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD
    ) as found:
        yield found


@pytest.fixture
def redis_server(sentinels: SentinelSet) -> EmbeddedRedis:
    """Replaces the plain one of tests/conftest.py: the ``stack`` is built on the set's primary, and
    reaches it through the sentinels (below), never by its address."""
    return sentinels.servers.primary


@pytest.fixture
def sentinel_stack(stack: Stack, sentinels: SentinelSet) -> Stack:
    del stack.env["GENQ_REDIS_URL"]
    stack.env.update(sentinels.env())
    return stack


def test_jobs_complete_before_and_after_a_failover(sentinel_stack: Stack, sentinels: SentinelSet) -> None:
    stack = sentinel_stack
    worker = stack.worker(concurrency=2)
    producer = stack.producer()
    before = [producer.submit_image(f"before {i}", num_images=1).id for i in range(3)]
    assert all(r.state.value == "succeeded" for r in wait_all(producer, before, timeout=60))
    old_primary = sentinels.servers.primary.port

    sentinels.kill_primary()

    assert sentinels.primary_port() == sentinels.servers.primary.port != old_primary
    after = [producer.submit_image(f"after {i}", num_images=1).id for i in range(3)]
    records = wait_all(producer, after, timeout=60)
    assert all(r.state.value == "succeeded" for r in records), [(r.state, r.reason) for r in records]
    # They went through the new primary (the old one is dead), with the records and the queue on it.
    new = sentinels.servers.primary.client()
    assert all(new.exists(f"genq:job:{job_id}") for job_id in after)
    assert worker.process is not None and worker.process.poll() is None
    for log in (worker.output(), *(p.read_text() for p in stack.tmp.glob("*.log"))):
        assert MASTER_PASSWORD not in log and SENTINEL_PASSWORD not in log
