"""Operations: the Prometheus exporter checked against the ledger and the simulator's own counts during
and after a run, queue depth and age, ``genq health`` passing and failing for each reason, and JSON
log lines carrying the task and job they were written under."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest
import redis
import requests

from genq import keys, metrics
from genq.embedded import free_port
from genq.ledger import Ledger
from genq.schemas import JobState
from genq.simulator import SimConfig
from tests.helpers import Stack, wait_all
from tests.integration.procs import ARTIFACTS, Service, genq, sample, scrape, wait_http

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Exporter:
    url: str
    service: Service

    def scrape(self) -> Samples:
        answer = requests.get(self.url, timeout=30)
        answer.raise_for_status()
        return scrape(answer.text)


@pytest.fixture
def exporter(stack: Stack) -> Iterator[Exporter]:
    port = free_port()
    service = Service(
        genq("metrics", "--port", str(port)), {**os.environ, **stack.env}, stack.tmp / "metrics.log"
    )
    service.start()
    url = f"http://127.0.0.1:{port}/metrics"
    wait_http(url, service=service)
    yield Exporter(url, service)
    service.stop()


def jobs_by_pair(samples: Samples) -> dict[str, int]:
    return {
        f"{dict(labels)['kind']}:{dict(labels)['state']}": int(value)
        for (name, labels), value in samples.items()
        if name == "genq_jobs"
    }


# ------------------------------------------------------------------ the recorder


def test_recorder_round_trip(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.env["GENQ_REDIS_URL"])
    recorder = metrics.Recorder(client)
    for seconds in (0.003, 0.004, 0.02, 0.7, 45.0):
        recorder.upstream("status", seconds)
    recorder.upstream("trigger", 0.2, "http_5xx")
    recorder.upstream("status", 0.01, "read_timeout")
    recorder.throttled("status", 0.25)
    recorder.throttled("status", 0.5)
    recorder.upstream_closed(3.0)
    recorder.download(1000)
    recorder.download(24)

    got = metrics.read(client)

    status = got.latency["status"]
    assert status.count == 6
    assert status.sum == pytest.approx(0.003 + 0.004 + 0.02 + 0.7 + 45.0 + 0.01)
    cumulative = dict(status.buckets)
    assert (cumulative["0.005"], cumulative["0.01"], cumulative["0.025"], cumulative["1.0"]) == (2, 3, 4, 5)
    assert cumulative["30.0"] == 5 and cumulative["+Inf"] == 6
    assert [count for _, count in status.buckets] == sorted(count for _, count in status.buckets)
    assert got.errors == {("trigger", "http_5xx"): 1, ("status", "read_timeout"): 1}
    assert got.throttled == {"status": (2, pytest.approx(0.75))}
    assert got.upstream_closed == (1, 3.0)
    assert (got.downloads, got.download_bytes) == (2, 1024)
    assert set(client.hkeys(keys.METRICS)) >= {b"downloads", b"latency:status:0.005"}


def test_recorder_never_raises_when_redis_is_gone() -> None:
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    recorder = metrics.Recorder(dead)
    recorder.upstream("status", 0.1, "http_5xx")  # dropped, not raised: the job must not fail for a metric
    recorder.download(10)


# ------------------------------------------------------------------ the exporter against the truth


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(
        api_key="test-key-0d9f",
        images_per_job=2,
        duration={"kind": "fixed", "value": 1.5},
        error_5xx_rate=0.08,
        rate_429_rate=0.04,
        retry_after=0.2,
    )


def test_exporter_matches_the_ledger_and_the_upstream_during_and_after_a_run(
    stack: Stack, exporter: Exporter
) -> None:
    # A shared limit on status checks, so the limiter holds some back (and 429s close it for everyone).
    limits = {"GENQ_LIMITS_STATUS_RATE": "8"}
    stack.worker(concurrency=2, **limits)
    stack.beat(**limits)
    producer = stack.producer(**limits)
    ids = [producer.submit_image(f"a tide pool #{i}", num_images=2).id for i in range(12)]
    ids.append(producer.submit_image("a broken kiln [sim:fail]").id)

    # During the run: every job is counted in exactly one state, in one consistent read.
    seen_in_flight = seen_scheduled = 0.0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = exporter.scrape()
        pairs = jobs_by_pair(now)
        assert sum(v for k, v in pairs.items() if k.startswith("image:")) == len(ids), pairs
        in_flight = sample(now, "genq_jobs_in_flight", kind="image")
        terminal = sum(v for k, v in pairs.items() if JobState(k.split(":")[1]).terminal)
        assert in_flight == len(ids) - terminal
        seen_in_flight = max(seen_in_flight, in_flight)
        seen_scheduled = max(seen_scheduled, sample(now, "genq_due", index="jobs", when="scheduled"))
        if in_flight == 0:
            break
        time.sleep(0.3)
    assert seen_in_flight > 0 and seen_scheduled > 0

    records = wait_all(producer, ids, timeout=120)
    assert sorted(r.state.value for r in records) == ["failed"] + ["succeeded"] * 12, [
        r.error for r in records
    ]
    outputs = [o for r in records for o in r.outputs]
    after = _settled(exporter, lambda s: sample(s, "genq_downloads_total") >= len(outputs))

    # Jobs: the exporter says what the ledger says.
    assert jobs_by_pair(after) == Ledger(stack.ledger().redis).counts()
    assert sample(after, "genq_jobs", kind="image", state="succeeded") == 12
    assert sample(after, "genq_jobs", kind="image", state="failed") == 1
    assert sample(after, "genq_jobs_in_flight", kind="image") == 0
    assert sample(after, "genq_due", index="jobs", when="scheduled") == 0
    assert sample(after, "genq_due", index="jobs", when="overdue") == 0
    # Downloads: every file the ledger recorded, once, with its size.
    assert sample(after, "genq_downloads_total") == len(outputs) == 24
    assert sample(after, "genq_download_bytes_total") == sum(o.bytes for o in outputs)
    # Upstream: every request the simulator answered, by family, and every error it injected.
    sim = stack.sim.stats(include_jobs=False)
    requests_seen = {
        "trigger": sample(after, "genq_upstream_request_duration_seconds_count", family="trigger"),
        "status": sample(after, "genq_upstream_request_duration_seconds_count", family="status"),
    }
    assert requests_seen == {
        "trigger": sim["requests"].get("POST /images/generation", 0),
        "status": sim["requests"].get("GET /jobs", 0),
    }
    assert (
        sample(after, "genq_upstream_request_duration_seconds_bucket", family="status", le="+Inf")
        == requests_seen["status"]
    )
    injected_5xx = sum(n for code, n in sim["responses"].items() if code in ("500", "502", "503"))
    counted_5xx = sum(
        sample(after, "genq_upstream_errors_total", family=f, error="http_5xx") for f in requests_seen
    )
    assert counted_5xx == injected_5xx > 0
    counted_429 = sum(
        sample(after, "genq_upstream_errors_total", family=f, error="http_429") for f in requests_seen
    )
    assert counted_429 == sim["responses"].get("429", 0)
    assert sample(after, "genq_upstream_closures_total") == counted_429
    assert sample(after, "genq_ratelimit_waits_total", family="status") > 0
    assert sample(after, "genq_ratelimit_wait_seconds_total", family="status") > 0
    # The sweeper ran; nothing is left waiting in the queues.
    assert sample(after, "genq_sweeper_last_run_timestamp_seconds") > 0
    assert sample(after, "genq_redis_up") == 1 and sample(after, "genq_broker_up") == 1
    for queue in ("submit", "poll", "download", "training"):
        assert sample(after, "genq_queue_messages", queue=queue) == 0


def _settled(exporter: Exporter, done: object, timeout: float = 15) -> Samples:
    """A scrape once ``done(scrape)``: a task's metrics land just after the step that ended its job."""
    deadline = time.monotonic() + timeout
    while True:
        samples = exporter.scrape()
        if done(samples) or time.monotonic() > deadline:  # type: ignore[operator]
            return samples
        time.sleep(0.2)


def test_queue_depth_and_age_of_the_oldest_stamped_message(stack: Stack, exporter: Exporter) -> None:
    producer = stack.producer()
    stamped_at = time.time()
    producer.celery.send_task(
        "genq.submit", args=["a"], queue="submit", headers={metrics.SENT_AT_HEADER: stamped_at}
    )
    producer.celery.send_task("genq.submit", args=["b"], queue="submit", headers=metrics.sent_at_header())
    # The oldest of all comes from another client: a Celery message without the stamp, at the tail.
    client = stack.ledger().redis
    foreign = json.loads(client.lindex("submit", 0))
    del foreign["headers"][metrics.SENT_AT_HEADER]
    client.rpush("submit", json.dumps(foreign))

    before = time.time()
    samples = exporter.scrape()
    after = time.time()

    assert sample(samples, "genq_queue_messages", queue="submit") == 3
    age = sample(samples, "genq_queue_oldest_message_age_seconds", queue="submit")
    assert before - stamped_at <= age <= after - stamped_at
    assert sample(samples, "genq_queue_messages", queue="poll") == 0


def test_messages_workers_publish_carry_their_send_time(stack: Stack, exporter: Exporter) -> None:
    stack.worker(queues=("submit",))  # nobody consumes poll: the first poll stays in its queue
    producer = stack.producer()
    job = producer.submit_image("a copper kettle")
    client = stack.ledger().redis
    deadline = time.monotonic() + 30
    while client.llen("poll") == 0:
        assert time.monotonic() < deadline, "the submit never sent its first poll"
        time.sleep(0.1)

    message = json.loads(client.lindex("poll", -1))
    assert message["headers"]["task"] == "genq.poll"
    assert isinstance(message["headers"][metrics.SENT_AT_HEADER], float)
    samples = exporter.scrape()
    assert sample(samples, "genq_queue_messages", queue="poll") == 1
    assert sample(samples, "genq_queue_oldest_message_age_seconds", queue="poll") >= 0
    assert producer.status(job.id).state is JobState.SUBMITTED


# ------------------------------------------------------------------ genq health


def health(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        genq("health", "--timeout", "2", *args),
        env={**os.environ, **stack.env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_health_passes_with_workers_on_every_queue_and_a_sweeper(stack: Stack) -> None:
    worker = stack.worker()
    stack.beat()
    deadline = time.monotonic() + 30
    while stack.ledger().last_swept() is None:
        assert time.monotonic() < deadline, "the sweeper never ran"
        time.sleep(0.2)

    done = health(stack, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {c["name"]: c for c in json.loads(done.stdout)}
    assert set(checks) == {"redis", "broker", "workers", "sweeper"}
    assert all(c["ok"] for c in checks.values())

    assert (
        health(stack, "--node", worker.hostname, "--queue", "download", "--skip", "sweeper").returncode == 0
    )
    wrong = health(stack, "--node", "nobody@" + socket.gethostname(), "--skip", "sweeper")
    assert wrong.returncode == 1
    assert f"worker nobody@{socket.gethostname()} did not answer" in wrong.stdout


def test_health_names_the_queue_without_a_worker_and_a_sweeper_that_never_ran(stack: Stack) -> None:
    stack.worker(queues=("submit", "poll"))
    done = health(stack)
    assert done.returncode == 1
    assert "FAIL workers  no live worker consumes download, training" in done.stdout
    assert "FAIL sweeper  the sweeper never ran" in done.stdout
    assert "ok   redis" in done.stdout and "ok   broker" in done.stdout


def test_health_fails_on_a_stale_sweeper(stack: Stack) -> None:
    client = stack.ledger().redis
    client.set(keys.SWEEP_LAST, repr(time.time() - 600))
    done = health(stack, "--skip", "workers", "--sweep-max-age", "120")
    assert done.returncode == 1
    assert re.search(r"FAIL sweeper  the sweeper last ran 6\d\ds ago \(limit 120s\)", done.stdout), (
        done.stdout
    )


def test_health_fails_when_redis_is_down(stack: Stack) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    done = health(stack, "--skip", "sweeper", GENQ_REDIS_URL=dead)
    assert done.returncode == 1
    assert "FAIL redis" in done.stdout and "FAIL broker" in done.stdout


def test_health_checks_urls(stack: Stack) -> None:
    up = health(
        stack,
        "--skip",
        "workers",
        "--skip",
        "sweeper",
        "--skip",
        "broker",
        "--url",
        stack.sim.url + "/_sim/stats",
    )
    assert up.returncode == 0, up.stdout
    down = f"http://127.0.0.1:{free_port()}/healthcheck"
    failed = health(stack, "--skip", "workers", "--skip", "sweeper", "--url", down)
    assert failed.returncode == 1
    assert f"FAIL url      {down}: ConnectionError" in failed.stdout


# ------------------------------------------------------------------ JSON log lines


def test_json_logs_carry_task_and_job_on_every_task_line(stack: Stack) -> None:
    worker = stack.worker(GENQ_LOG_FORMAT="json")
    producer = stack.producer()
    ids = [producer.submit_image(f"a paper crane #{i}").id for i in range(3)]
    wait_all(producer, ids, timeout=90)
    worker.stop()

    text = worker.log_path.read_text()
    lines, not_json = [], []
    for raw in filter(str.strip, text.splitlines()):
        try:
            lines.append(json.loads(raw))
        except ValueError:
            not_json.append(raw[:300])
    assert not_json == []  # shows the offending lines if one process's line was not JSON
    assert len(lines) > 20
    assert all(
        {"ts", "level", "logger", "message", "task", "task_id", "job_id"} <= set(line) for line in lines
    )
    in_tasks = [line for line in lines if line["task"]]
    assert {line["task"] for line in in_tasks} >= {
        "genq.submit",
        "genq.poll",
        "genq.download",
    }
    # The download that completes the set finalizes the job in its own task, and says so there.
    assert any(line["task"] == "genq.download" and "succeeded with" in line["message"] for line in lines)
    for line in in_tasks:
        assert line["job_id"] in ids, line
        assert line["task_id"]
    # Celery's own lines about each task (received, in the main process; succeeded) carry it too.
    received = [line for line in lines if line["message"].endswith("] received")]
    assert len(received) >= 3 * 4
    assert all(line["task"] in line["message"] and line["job_id"] in ids for line in received)
    succeeded = [line for line in lines if " succeeded in " in line["message"]]
    assert succeeded and all(line["job_id"] in ids for line in succeeded)
    # genqueue's own lines, e.g. the submit's, name the same job as their context.
    submitted = [line for line in lines if "submitted as upstream" in line["message"]]
    assert {line["job_id"] for line in submitted} == set(ids)
    assert all(line["job_id"] in line["message"] for line in submitted)
    assert stack.sim.api_key not in text


# ------------------------------------------------------------------ throughput per pool (make a note of it)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sim_config",
    [SimConfig(api_key="test-key-0d9f", images_per_job=1, duration={"kind": "fixed", "value": 0})],
)
def test_pool_throughput(stack: Stack, sim_config: SimConfig) -> None:
    """Throughput of each pool, sized as in docker-compose.yml, with the simulator answering at once, and
    the CPU each unit of work costs the pool, Redis and the simulator. Each stage's backlog is queued
    first and its pool started after (start-up is not counted). Numbers go to
    test-artifacts/pool-throughput.json (README, Scaling); it only checks that every job got through."""
    n = 500
    producer = stack.producer()
    ledger = stack.ledger()
    ids = [producer.submit_image(f"a pebble #{i}").id for i in range(n)]
    results: dict[str, dict[str, float]] = {}

    def cpu(pid: int) -> float:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)

    def stage(name: str, queues: tuple[str, ...], pool: str, concurrency: int, done: object) -> None:
        worker = stack.worker(queues=queues, pool=pool, concurrency=concurrency)
        cpu_before = {
            "pool": cpu(worker.pid),
            "redis": cpu(stack.redis.process.pid),
            "sim": cpu(stack.sim.pid),
        }  # type: ignore[union-attr]
        started = time.monotonic()
        while not done():  # type: ignore[operator]
            assert time.monotonic() < started + 300, f"{name} did not finish: {ledger.counts()}"
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu_after = {
            "pool": cpu(worker.pid),
            "redis": cpu(stack.redis.process.pid),
            "sim": cpu(stack.sim.pid),
        }  # type: ignore[union-attr]
        results[name] = {
            "per_second": round(n / elapsed, 1),
            **{f"cpu_ms_{k}": round(1000 * (cpu_after[k] - cpu_before[k]) / n, 2) for k in cpu_before},
        }
        worker.stop()

    counts = ledger.counts
    stage(
        "submit, prefork x2 (jobs)", ("submit",), "prefork", 2, lambda: counts().get("image:submitted") == n
    )
    stage("poll, prefork x4 (polls)", ("poll",), "prefork", 4, lambda: counts().get("image:downloading") == n)
    stage(
        "download, threads x8 (files)",
        ("download",),
        "threads",
        8,
        lambda: metrics.read(ledger.redis).downloads == n,
    )
    stage(
        "finalize on poll, prefork x4 (jobs)",
        ("poll",),
        "prefork",
        4,
        lambda: counts().get("image:succeeded") == n,
    )

    # All three pools at once on this one host, as docker-compose.yml runs them: a burst, end to end.
    for queues, pool, concurrency in (
        (("submit",), "prefork", 2),
        (("poll",), "prefork", 4),
        (("download",), "threads", 8),
    ):
        stack.worker(queues=queues, pool=pool, concurrency=concurrency)
    cpu_before = cpu(os.getpid())  # this process and all its children: the pools, Redis, the simulator
    started = time.monotonic()
    more = [producer.submit_image(f"a shell #{i}").id for i in range(n)]
    submitted = time.monotonic() - started
    wait_all(producer, more, timeout=300)
    elapsed = time.monotonic() - started
    cpu_used = cpu(os.getpid()) - cpu_before
    results["all pools on one host, submit to succeeded (jobs)"] = {
        "per_second": round(n / elapsed, 1),
        "producer_submits_per_second": round(n / submitted, 1),
        "cpu_ms_everything": round(1000 * cpu_used / n, 2),
        "cpus_busy": round(cpu_used / elapsed, 2),
    }

    assert all(r.state is JobState.SUCCEEDED for r in (producer.status(i) for i in ids + more))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "pool-throughput.json").write_text(
        json.dumps({"jobs": n, "cpus": os.cpu_count(), **results}, indent=2)
    )
    print(json.dumps(results, indent=2))
