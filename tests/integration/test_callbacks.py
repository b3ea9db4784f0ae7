"""Completion callbacks: a Celery task by name to the producer's own worker, or a signed webhook."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from genq.errors import InvalidRequest
from genq.processes import WorkerProcess
from genq.schemas import JobState
from genq.simulator import SimConfig
from tests.conftest import Stack, wait_all

pytestmark = pytest.mark.integration
SECRET = "whsec-test-5b1"
ROOT = Path(__file__).parents[2]
CALLBACK_ENV = {
    "GENQ_CALLBACKS_SECRET": SECRET,
    "GENQ_CALLBACKS_ALLOW_HTTP": "true",
    "GENQ_CALLBACKS_ALLOWED_NETWORKS": "127.0.0.0/8",
    "GENQ_CALLBACKS_TIMEOUT": "1",
    "GENQ_CALLBACKS_BACKOFF": "0.2",
    "GENQ_CALLBACKS_MAX_ATTEMPTS": "3",
    "GENQ_POLL_IMAGE": '{"first_delay": 0.3, "interval": 0.3, "max_interval": 1, "deadline": 3}',
}


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(api_key="test-key-0d9f", images_per_job=1)


def _receiver_worker(stack: Stack) -> WorkerProcess:
    env = {**os.environ, "RECEIVER_BROKER": stack.env["GENQ_REDIS_URL"], "PYTHONPATH": str(ROOT)}
    worker = WorkerProcess(
        env,
        queues=("myapp",),
        concurrency=1,
        log_path=stack.tmp / "receiver.log",
        app="tests.integration.receiver_app",
        cwd=ROOT,
    )
    stack.workers.append(worker)
    return worker.start()


def _received(stack: Stack) -> list[dict[str, object]]:
    client = redis.Redis.from_url(stack.env["GENQ_REDIS_URL"])
    return [json.loads(item) for item in client.lrange("receiver:got", 0, -1)]


def test_a_task_by_name_gets_exactly_one_callback_per_job(stack: Stack) -> None:
    stack.worker(**CALLBACK_ENV)
    _receiver_worker(stack)
    producer = stack.producer(**CALLBACK_ENV)
    target = {"task": "myapp.on_generation_done", "queue": "myapp"}
    jobs = {
        "succeeded": producer.submit_image("fine", callback=target),
        "failed": producer.submit_image("boom [sim:fail]", callback=target),
        "timed_out": producer.submit_image("forever [sim:never]", callback=target),
        "workflow": producer.submit_workflow("a boat", callback=target),
    }
    records = wait_all(producer, [j.id for j in jobs.values()], timeout=40)
    deadline = time.monotonic() + 20
    while len(_received(stack)) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a duplicate would show up by now

    got = _received(stack)
    assert Counter(r["id"] for r in got) == Counter(j.id for j in jobs.values())
    by_id = {r["id"]: r for r in got}
    assert by_id[jobs["succeeded"].id]["state"] == "succeeded"
    (out,) = by_id[jobs["succeeded"].id]["outputs"]  # type: ignore[misc]
    assert Path(out["path"]).is_file() and len(out["sha256"]) == 64
    assert by_id[jobs["failed"].id]["state"] == "failed" and "simulated failure" in str(
        by_id[jobs["failed"].id]["reason"]
    )
    assert by_id[jobs["timed_out"].id]["state"] == "timed_out"
    assert by_id[jobs["workflow"].id]["state"] == "succeeded" and by_id[jobs["workflow"].id]["steps"]
    records = [producer.status(j.id) for j in jobs.values()]  # as they are now, after the deliveries
    assert all(r.callback_state == "delivered" and r.callback_attempts == 1 for r in records)


class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, bool, bytes]] = []  # (path, delivery id, signature valid, body)
    flaky_left = 2

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        fields = dict(part.split("=", 1) for part in self.headers["Genq-Signature"].split(","))
        expected = hmac.new(SECRET.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(expected, fields["v1"])
        type(self).seen.append((self.path, self.headers["Genq-Delivery"], valid, body))
        if self.path == "/dead":
            time.sleep(3)  # longer than GENQ_CALLBACKS_TIMEOUT
            return
        status = 200
        if self.path == "/flaky" and type(self).flaky_left > 0:
            type(self).flaky_left -= 1
            status = 500
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.seen, Receiver.flaky_left = [], 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_signed_webhooks_retried_with_one_delivery_id(stack: Stack, receiver: str) -> None:
    stack.worker(concurrency=4, **CALLBACK_ENV)
    producer = stack.producer(**CALLBACK_ENV)
    dead = producer.submit_image("dead receiver", callback={"url": receiver + "/dead"})
    flaky = producer.submit_image("flaky receiver", callback={"url": receiver + "/flaky"})
    fine = [producer.submit_image(f"ok {i}", callback={"url": receiver + "/ok"}) for i in range(3)]
    wait_all(producer, [j.id for j in (dead, flaky, *fine)], timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [producer.status(j.id).callback_state for j in (dead, flaky, *fine)]
        if "pending" not in states:
            break
        time.sleep(0.2)

    assert all(valid for _, _, valid, _ in Receiver.seen)
    flaky_calls = [(d, json.loads(b)) for p, d, _, b in Receiver.seen if p == "/flaky"]
    assert len(flaky_calls) == 3 and len({d for d, _ in flaky_calls}) == 1
    assert flaky_calls[0][1]["id"] == flaky.id and flaky_calls[0][1]["delivery_id"] == flaky_calls[0][0]
    record = producer.status(flaky.id)
    assert (record.callback_state, record.callback_attempts) == ("delivered", 3)
    gone = producer.status(dead.id)
    assert gone.state is JobState.SUCCEEDED  # the job keeps its own state
    assert (
        gone.callback_state == "failed"
        and gone.callback_attempts == 3
        and "gave up" in (gone.callback_error or "")
    )
    assert all(producer.status(j.id).callback_state == "delivered" for j in fine)
    assert sum(p == "/ok" for p, *_ in Receiver.seen) == 3


def test_a_lost_callback_message_is_delivered_by_the_sweeper(stack: Stack) -> None:
    """The worker that ended the job died before the callback went out (its message is gone)."""
    stack.worker(queues=("submit", "poll"), **CALLBACK_ENV)
    stack.beat(**CALLBACK_ENV)
    _receiver_worker(stack)
    producer = stack.producer(**CALLBACK_ENV)
    job = producer.submit_image(
        "boom [sim:fail]", callback={"task": "myapp.on_generation_done", "queue": "myapp"}
    )
    wait_all(producer, [job.id], timeout=20)
    client = redis.Redis.from_url(stack.env["GENQ_REDIS_URL"])
    deadline = time.monotonic() + 5
    while not client.llen("download") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.delete("download") == 1  # the genq.callback message, lost
    stack.worker(queues=("download",), **CALLBACK_ENV)

    deadline = time.monotonic() + 20
    while not _received(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [r["id"] for r in _received(stack)] == [job.id]
    assert producer.status(job.id).callback_state == "delivered"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/hook", "https://10.1.2.3/hook", "https://169.254.169.254/x", "http://localhost/x"],
)
def test_private_webhook_urls_are_refused_at_submit_unless_allow_listed(stack: Stack, url: str) -> None:
    producer = stack.producer(GENQ_CALLBACKS_ALLOW_HTTP="true")
    with pytest.raises(InvalidRequest, match=r"callback\.url"):
        producer.submit_image("x", callback={"url": url})
    assert stack.ledger().list_ids() == []
    allowed = stack.producer(
        GENQ_CALLBACKS_ALLOW_HTTP="true",
        GENQ_CALLBACKS_ALLOWED_NETWORKS="127.0.0.0/8,10.0.0.0/8,169.254.0.0/16",
    )
    if "localhost" not in url:  # a name, refused whatever it resolves to
        assert allowed.submit_image("x", callback={"url": url}).created


def test_the_command_line_takes_a_callback_and_shows_its_delivery(stack: Stack) -> None:
    import subprocess
    import sys

    stack.worker(**CALLBACK_ENV)
    _receiver_worker(stack)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")} | stack.env | CALLBACK_ENV
    genq = str(Path(sys.executable).with_name("genq"))
    submitted = subprocess.run(
        [genq, "submit", "image", "--prompt", "from the shell", "--callback-task", "myapp.on_generation_done",
         "--callback-queue", "myapp", "--wait", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    deadline = time.monotonic() + 20
    while not _received(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    status = subprocess.run([genq, "status", job_id], env=env, capture_output=True, text=True, timeout=30)
    assert "callback: task myapp.on_generation_done on myapp: delivered, 1 attempts" in status.stdout
    assert [r["id"] for r in _received(stack)] == [job_id]
    only_task = [genq, "submit", "image", "--prompt", "x", "--callback-task", "myapp.t"]
    half = subprocess.run(only_task, env=env, capture_output=True, text=True, timeout=30)
    assert half.returncode == 2 and "--callback-queue" in half.stderr
