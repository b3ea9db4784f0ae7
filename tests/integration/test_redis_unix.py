"""Redis on a unix socket, for real: the server listens on a socket only (``--port 0``), genqueue is
given redis-py's ``unix://`` URL, and a worker runs a job through it (kombu and Celery get it as
``redis+socket://``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.redis_topologies import UnixRedis

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_server() -> Iterator[UnixRedis]:
    """Replaces the TCP one of tests/conftest.py. Its own short temp dir: a socket path must fit in
    107 bytes, which pytest's tmp_path may not."""
    with UnixRedis(extra_args=("--databases", "4")) as server:
        yield server


def test_a_worker_runs_a_job_over_a_unix_socket(stack: Stack, redis_server: UnixRedis) -> None:
    url = f"unix://{redis_server.socket_path}?db=2"
    stack.env["GENQ_REDIS_URL"] = url
    stack.worker(concurrency=1)
    producer = stack.producer()

    job = producer.submit_image("a fox by socket", num_images=1)
    record = job.wait(timeout=60)

    assert record.state.value == "succeeded"
    assert record.outputs and Path(record.outputs[0].path).is_file()
    # Ledger and broker both used database 2 of this server (and nothing else listens).
    db2 = redis_server.client(db=2)
    assert db2.exists(f"genq:job:{job.id}")
    assert any(key.startswith(b"_kombu") for key in db2.keys("*"))
    assert not redis_server.client(db=0).keys("*")
