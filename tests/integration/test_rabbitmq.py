"""RabbitMQ as the broker (``GENQ_REDIS_BROKER_URL=amqp://...``), Redis kept for the ledger: a batch runs
through it, health and the exporter work on it. Uses the RabbitMQ on 127.0.0.1:5672 in a fresh vhost of
its own (deleted afterwards), so nothing collides with anyone else's queues; skipped where none answers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import requests

from genq.schemas import JobState
from tests.helpers import Stack, wait_all
from tests.integration.procs import genq, sample, scrape

pytestmark = pytest.mark.integration

HOST, PORT = "127.0.0.1", 5672
ADMIN = ("guest", "guest")
MANAGEMENT = f"http://{HOST}:15672/api"


def _answers() -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, PORT)) == 0


def _ctl(*args: str) -> bool:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    done = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)
    return done.returncode == 0


def _api(method: str, path: str, body: object = None) -> bool:
    try:
        answer = requests.request(method, f"{MANAGEMENT}/{path}", json=body, auth=ADMIN, timeout=10)
    except requests.RequestException:
        return False
    return answer.status_code < 300


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost for this test, through rabbitmqctl or the management API, removed afterwards."""
    if not _answers():
        pytest.skip(f"no RabbitMQ answering on {HOST}:{PORT}")
    name = f"genq-test-{uuid.uuid4().hex[:10]}"
    if _ctl("add_vhost", name) and _ctl("set_permissions", "-p", name, ADMIN[0], ".*", ".*", ".*"):
        through = "rabbitmqctl"
    elif _api("PUT", f"vhosts/{name}") and _api(
        "PUT", f"permissions/{name}/{ADMIN[0]}", {"configure": ".*", "write": ".*", "read": ".*"}
    ):
        through = "api"
    else:
        pytest.skip("RabbitMQ answers, but no vhost could be made (no rabbitmqctl, no management API)")
    try:
        yield name
    finally:
        if through == "rabbitmqctl":
            _ctl("delete_vhost", name)
        else:
            _api("DELETE", f"vhosts/{name}")


def test_a_batch_runs_with_rabbitmq_as_the_broker(stack: Stack, vhost: str) -> None:
    broker = {"GENQ_REDIS_BROKER_URL": f"amqp://{ADMIN[0]}:{ADMIN[1]}@{HOST}:{PORT}/{vhost}"}
    stack.worker(concurrency=2, **broker)
    stack.beat(**broker)
    producer = stack.producer(**broker)
    ids = [producer.submit_image(f"a rabbit in clover #{i}", num_images=2).id for i in range(8)]
    ids.append(producer.submit_workflow("a carrot field", num_images=1, upscale_factor=2).id)

    records = wait_all(producer, ids, timeout=150)

    assert [r.state for r in records] == [JobState.SUCCEEDED] * len(ids), [r.error for r in records]
    assert sum(len(r.outputs) for r in records) == 8 * 2 + 1
    # The messages went through RabbitMQ: Redis, the ledger, holds no queue.
    ledger_redis = stack.ledger().redis
    assert [ledger_redis.llen(q) for q in ("submit", "poll", "download", "training")] == [0, 0, 0, 0]
    assert not list(ledger_redis.scan_iter("_kombu.binding.*"))

    env = {**os.environ, **stack.env, **broker}
    health = subprocess.run(
        genq("health", "--timeout", "3"), env=env, capture_output=True, text=True, timeout=60
    )
    assert health.returncode == 0, health.stdout + health.stderr
    assert f"connected to amqp://{ADMIN[0]}:**@{HOST}:{PORT}/{vhost}" in health.stdout

    once = subprocess.run(genq("metrics", "--once"), env=env, capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    samples = scrape(once.stdout)
    assert sample(samples, "genq_broker_up") == 1
    for queue in ("submit", "poll", "download", "training"):
        assert ("genq_queue_messages", (("queue", queue),)) in samples
    assert sample(samples, "genq_jobs", kind="image", state="succeeded") == 8 + 1
