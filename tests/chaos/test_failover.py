"""Failover under load (issue #12): a batch of mixed jobs on a Sentinel set (primary, replica, three
sentinels) while the primary is SIGKILLed and the sentinels promote the replica; the killed server comes
back as a replica of the new primary, so a second kill has a replica to promote. Workers, beat and the
producer reach Redis only through the sentinels, with ``GENQ_REDIS_DURABLE_REPLICAS=1`` (WAIT for the
replica before every paid POST).

The audit is the chaos suite's (``tests/chaos/harness.py``): every accepted job terminal with a reason,
at most one POST per job (the simulator's own count, by each request's unique tag), no sha mismatch, no
partial file at a final path. Writes the replica had not received are lost with the primary; the figures
say what that cost (re-downloads, re-polls, jobs that vanished, WAIT timeouts)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import redis

from genq.embedded import EmbeddedRedis
from genq.errors import GenqError
from genq.producer import Producer
from genq.schemas import JobKind, JobState
from genq.simulator import SimConfig
from tests.chaos.harness import Chaos, Figures, Plan
from tests.helpers import Stack
from tests.redis_topologies import SentinelSet, sentinel_set, wait_until

pytestmark = pytest.mark.integration
ARTIFACTS = Path(os.environ.get("GENQ_ARTIFACTS", "test-artifacts"))


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(api_key="test-key-0d9f", images_per_job=1, seed=11)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    with sentinel_set(tmp_path / "sentinel-set") as found:
        yield found


@pytest.fixture
def redis_server(sentinels: SentinelSet) -> EmbeddedRedis:
    """The ``stack`` is built on the set's primary but reaches it through the sentinels only."""
    return sentinels.servers.primary


@pytest.fixture
def sentinel_stack(stack: Stack, sentinels: SentinelSet) -> Stack:
    del stack.env["GENQ_REDIS_URL"]
    stack.env.update(sentinels.env())
    return stack


def _info(server: EmbeddedRedis, section: str) -> dict[str, Any]:
    client = server.client(socket_timeout=2)
    try:
        with contextlib.suppress(redis.RedisError):
            return dict(client.info(section))
        return {}
    finally:
        client.close()


def _replica_seen_up(sentinels: SentinelSet, port: int) -> bool:
    """Every sentinel lists the server on ``port`` as a replica that is up with its link to the primary
    up: a candidate for the next promotion."""
    for node in sentinels.sentinels:
        client = node.client()
        try:
            replicas = client.sentinel_slaves(sentinels.master)
        except redis.RedisError:
            return False
        finally:
            client.close()
        ok = [
            r
            for r in replicas
            if int(r["port"]) == port
            and not r.get("is_sdown")
            and not r.get("is_disconnected")
            and r.get("master-link-status") == "ok"
        ]
        if not ok:
            return False
    return True


def _detach(primary: EmbeddedRedis, replica: EmbeddedRedis, seconds: float) -> None:
    """A replica ``seconds`` behind at the kill: its link is cut (it cannot authenticate to reconnect)
    while the primary goes on accepting writes, which the kill then loses."""
    client = replica.client(socket_timeout=2)
    try:
        client.config_set("masterauth", "not-the-password")
    finally:
        client.close()
    client = primary.client(socket_timeout=2)
    try:
        client.client_kill_filter(_type="replica")
    finally:
        client.close()
    time.sleep(seconds)


def _reattach_soon(replica: EmbeddedRedis) -> None:
    client = replica.client(socket_timeout=2)
    try:
        client.config_set("masterauth", "")
    finally:
        client.close()


class Failover(Chaos):
    """The chaos run with failovers instead of worker kills and Redis restarts (the upstream faults stay:
    10% 5xx, 429 bursts, slow spells)."""

    def __init__(
        self,
        stack: Stack,
        plan: Plan,
        sentinels: SentinelSet,
        failovers: int,
        *,
        durable_replicas: int = 1,
        lag: float = 0.0,
    ) -> None:
        super().__init__(stack, plan)
        self.sentinels = sentinels
        self.planned = failovers
        self.lag = lag
        self.env["GENQ_REDIS_DURABLE_REPLICAS"] = str(durable_replicas)
        self.env["GENQ_REDIS_DURABLE_TIMEOUT"] = "0.5"
        self.failovers: list[dict[str, Any]] = []
        self.costs: dict[str, Any] = {}
        self.vanished: list[str] = []
        self.vanished_requests: list[int] = []

    # ------------------------------------------------------------------ the failovers

    def _kill(self) -> None:
        due = [self.plan.submit_seconds * (k + 1) / (self.planned + 1) for k in range(self.planned)]
        started = time.monotonic()
        while due:  # _submit waits for the last one, so the batch is still running
            if time.monotonic() - started >= due[0]:
                due.pop(0)
                self.failovers.append(self._failover())
            time.sleep(0.1)

    def _failover(self) -> dict[str, Any]:
        s = self.sentinels
        old, replica = s.servers.primary, s.servers.replica
        if self.lag:
            _detach(old, replica, self.lag)
        # How far the replica was behind at the moment of the kill: what can be lost with the primary.
        before_primary = _info(old, "replication").get("master_repl_offset", 0)
        before_replica = _info(replica, "replication").get("slave_repl_offset", 0)
        killed = time.monotonic()
        self.accepted_at_kill = len(self.accepted)
        if self.lag:
            _reattach_soon(replica)
        s.kill_primary(timeout=30)  # SIGKILL, then every sentinel names the replica, which takes writes
        promoted = time.monotonic()
        new = s.servers.primary
        new_client = new.client(socket_timeout=2)
        try:
            promoted_offset = int(new_client.info("replication").get("master_repl_offset", 0))
            # The new primary ships its data to the returning server at once (the default waits 5 s
            # for more replicas to join a diskless sync).
            new_client.config_set("repl-diskless-sync-delay", 0)
        finally:
            new_client.close()
        # The killed server comes back as a replica of the new primary (its AOF is replaced by a sync).
        old.extra_args = ("--replicaof", "127.0.0.1", str(new.port), "--repl-diskless-sync-delay", "0")
        old.start()
        wait_until(
            lambda: _info(old, "replication").get("master_link_status") == "up", 30, "old primary in sync"
        )
        synced = time.monotonic()
        wait_until(lambda: _replica_seen_up(s, old.port), 30, "sentinels see the replica up")
        ready = time.monotonic()
        event = {
            "killed_port": old.port,
            "promoted_port": new.port,
            "replica_lag_bytes_at_kill": max(0, int(before_primary) - int(before_replica)),
            "promoted_offset": promoted_offset,
            "seconds_to_promoted": promoted - killed,
            "seconds_without_replica": synced - killed,
            "seconds_until_sentinels_see_replica": ready - killed,
            "at_seconds": killed - self._started,
            "jobs_accepted_before_kill": self.accepted_at_kill,
        }
        print(f"failover: {event}")
        return event

    def run(self) -> Figures:
        self._started = time.monotonic()
        return super().run()

    def _submit(self, producer: Producer) -> None:
        super()._submit(producer)
        # Let the last planned failover happen during the batch, not after it.
        while len(self.failovers) < self.planned:
            time.sleep(0.2)

    # ------------------------------------------------------------------ the audit

    def _wait_terminal(self, producer: Producer, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(r is None or r.terminal for r in (_status(producer, i) for i in self.accepted)):
                break
            time.sleep(0.5)
        # A job whose record did not reach the replica before the kill is gone from the ledger: the
        # producer had its id, the new primary never heard of it. Counted (and failed below), not hidden.
        self.vanished = [i for i in self.accepted if _status(producer, i) is None]
        self.vanished_requests = [self.accepted.index(i) for i in self.vanished]  # chaos-<n>
        self.accepted = [i for i in self.accepted if i not in self.vanished]

    def _audit(self, producer: Producer) -> None:
        super()._audit(producer)
        self.figures.lost += len(self.vanished)
        records = [producer.status(i) for i in self.accepted]
        steps = [producer.status(c) for r in records for c in r.children]
        media = [r for r in [*records, *steps] if r.kind is not JobKind.WORKFLOW]
        per_job = self.stack.sim.stats(include_jobs=True)["per_job"]
        per_tag = Counter(
            str(j["request"].get("prompt") or j["request"].get("image_id")) for j in self.stack.sim.jobs()
        )
        posts = Counter(per_tag[self._tag(r)] for r in media)
        files_again = sum(
            max(0, int(per_job.get(r.upstream_id or "", {}).get("files", 0)) - len(r.outputs))
            for r in media
            if r.state is JobState.SUCCEEDED
        )
        logs = "\n".join(p.read_text(errors="replace") for p in self.stack.tmp.glob("*.log"))
        reasons = Counter(
            re.sub(r"[0-9a-f]{32}|\d+(\.\d+)?", "N", r.error or "")[:90]
            for r in records
            if r.state is not JobState.SUCCEEDED
        )
        self.costs = {
            "vanished_jobs": len(self.vanished),
            "vanished_requests": self.vanished_requests,
            "states": dict(Counter(r.state.value for r in records)),
            "not_succeeded_reasons": dict(reasons.most_common(10)),
            "ledger_jobs_by_upstream_posts": {str(k): v for k, v in sorted(posts.items())},
            "file_downloads_beyond_one_per_output": files_again,
            "wait_timeouts_before_post": logs.count("replica(s) yet; nothing posted"),
            "pending_with_upstream_id_taken_up": logs.count("polling it, not posting again"),
            "left_submitting_during_post": logs.count("left submitting during the POST"),
            "posts_recorded_after_a_retry": len(set(re.findall(r"recording upstream job (\S+) again", logs))),
            "connection_errors_logged": len(re.findall(r"ConnectionError|Connection refused", logs)),
            "sim_requests": self.stack.sim.stats(include_jobs=False)["requests"],
        }

    def write(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "plan": asdict(self.plan),
            "figures": asdict(self.figures),
            "failovers": self.failovers,
            "costs": self.costs,
            "settings": {k: v for k, v in self.env.items() if k.startswith("GENQ_REDIS")},
        }
        out.write_text(json.dumps(doc, indent=2))


def _status(producer: Producer, job_id: str) -> Any:
    try:
        return producer.status(job_id)
    except GenqError:
        return None


def _check(figures: Figures, run: Failover, planned: int) -> None:
    line = figures.line() + f" failovers={len(run.failovers)} costs={run.costs}"
    assert len(run.failovers) == planned, line
    assert figures.lost == 0 and not run.vanished, line
    assert figures.terminal == figures.accepted, line
    assert figures.failed_without_reason == 0, line
    assert figures.max_posts_per_job <= 1, line
    assert figures.sha_mismatches == 0, line
    assert figures.partial_files == 0, line
    assert figures.succeeded > 0, line


def _run(
    stack: Stack, sentinels: SentinelSet, plan: Plan, failovers: int, name: str, **options: Any
) -> Failover:
    run = Failover(stack, plan, sentinels, failovers, **options)
    try:
        figures = run.run()
    finally:
        run.write(ARTIFACTS / f"{name}.json")
        print(f"\n{name}: {run.figures.line()} failovers={len(run.failovers)}\n{json.dumps(run.costs)}")
    if figures.lost or run.vanished or figures.submit_unknown:
        logs = ARTIFACTS / f"{name}-logs"
        logs.mkdir(parents=True, exist_ok=True)
        kept = [*stack.tmp.glob("*.log"), *stack.tmp.glob("**/sentinel.log"), *stack.tmp.glob("**/redis.log")]
        for log in kept:
            shutil.copy(log, logs / f"{log.parent.name}-{log.name}")
    if not options:
        _check(figures, run, failovers)
    return run


def test_failover_short(sentinel_stack: Stack, sentinels: SentinelSet) -> None:
    """~40 mixed jobs, one failover mid-batch."""
    plan = Plan(jobs=40, kill_every=1e9, kills=0, redis_restarts=0, submit_seconds=10)
    _run(sentinel_stack, sentinels, plan, failovers=1, name="failover-short")


@pytest.mark.slow
def test_failover_full(sentinel_stack: Stack, sentinels: SentinelSet) -> None:
    """200 mixed jobs, two failovers (the second promotes the server killed first)."""
    plan = Plan(jobs=200, kill_every=1e9, kills=0, redis_restarts=0, submit_seconds=60)
    _run(sentinel_stack, sentinels, plan, failovers=2, name="failover-full")


@pytest.mark.slow
@pytest.mark.parametrize("durable", [1, 0])
def test_failover_with_a_lagging_replica(sentinel_stack: Stack, sentinels: SentinelSet, durable: int) -> None:
    """The windows, measured: the replica's link is cut 2 s before the kill, so every write of those
    2 s is lost with the primary. With ``durable_replicas=1`` nothing that matters is in them: no POST
    is made (WAIT fails first) and no producer is told a job is accepted (its WAIT fails: EnqueueError,
    it submits again); what is lost is re-driven (downloads, polls). With 0 the same run is a
    measurement, not a promise: jobs accepted in those 2 s vanish (some already paid for) and a job
    whose move to submitting is lost can be posted twice. Figures in test-artifacts/."""
    plan = Plan(jobs=80, kill_every=1e9, kills=0, redis_restarts=0, submit_seconds=16)
    name = f"failover-lag-durable{durable}"
    run = _run(sentinel_stack, sentinels, plan, 1, name, durable_replicas=durable, lag=2.0)
    if durable:
        _check(run.figures, run, 1)
    else:
        f = run.figures
        assert f.terminal == f.accepted and f.failed_without_reason == 0 and f.sha_mismatches == 0, f.line()


def test_a_post_answered_during_an_election_is_recorded(
    sentinel_stack: Stack, sentinels: SentinelSet
) -> None:
    """The primary dies while a paid POST is in flight (the upstream takes 1.5 s to answer) and the
    answer comes back while the sentinels are still electing (about 2.3 s): the upstream job id is the
    only handle on a paid job, so the worker records it once a primary is back instead of failing the
    task (which left the job to end submit_unknown, paid and never fetched)."""
    stack = sentinel_stack
    env = {"GENQ_REDIS_DURABLE_REPLICAS": "1"}
    stack.worker(concurrency=2, **env)
    producer = stack.producer(**env)
    stack.sim.configure(latency=1.5)
    job = producer.submit_image("paid during the election", num_images=1)
    wait_until(lambda: producer.status(job.id).state is JobState.SUBMITTING, 30, "submitting")
    sentinels.kill_primary()
    record = _wait(producer, job.id, 60)
    posts = [j for j in stack.sim.jobs() if j["request"].get("prompt") == "paid during the election"]
    assert len(posts) == 1
    assert record.state is JobState.SUCCEEDED, (record.state, record.error)
    assert record.upstream_id == posts[0]["jobId"]


def _wait(producer: Producer, job_id: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        record = _status(producer, job_id)
        if record is not None and record.terminal:
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.2)
