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
from genq.models import JobKind, JobState
from genq.producer import Producer
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


class Failover(Chaos):
    """The chaos run with failovers instead of worker kills and Redis restarts (the upstream faults stay:
    10% 5xx, 429 bursts, slow spells)."""

    def __init__(self, stack: Stack, plan: Plan, sentinels: SentinelSet, failovers: int) -> None:
        super().__init__(stack, plan)
        self.sentinels = sentinels
        self.planned = failovers
        self.env["GENQ_REDIS_DURABLE_REPLICAS"] = "1"
        self.env["GENQ_REDIS_DURABLE_TIMEOUT"] = "0.5"
        self.failovers: list[dict[str, Any]] = []
        self.costs: dict[str, Any] = {}
        self.vanished: list[str] = []

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
        # How far the replica was behind at the moment of the kill: what can be lost with the primary.
        before_primary = _info(old, "replication").get("master_repl_offset", 0)
        before_replica = _info(replica, "replication").get("slave_repl_offset", 0)
        killed = time.monotonic()
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
        self.accepted = [i for i in self.accepted if i not in self.vanished]

    def _audit(self, producer: Producer) -> None:
        super()._audit(producer)
        self.figures.lost += len(self.vanished)
        records = [producer.status(i) for i in self.accepted]
        steps = [producer.status(c) for r in records for c in r.children]
        media = [r for r in [*records, *steps] if r.kind is not JobKind.WORKFLOW]
        per_job = self.stack.sim.stats(include_jobs=True)["per_job"]
        posts = Counter(int(per_job.get(r.upstream_id or "", {}).get("posts", 0)) for r in media)
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
            "states": dict(Counter(r.state.value for r in records)),
            "not_succeeded_reasons": dict(reasons.most_common(10)),
            "upstream_jobs_by_posts_per_ledger_job": {str(k): v for k, v in sorted(posts.items())},
            "file_downloads_beyond_one_per_output": files_again,
            "wait_timeouts_before_post": logs.count("replica(s) yet; nothing posted"),
            "pending_with_upstream_id_taken_up": logs.count("polling it, not posting again"),
            "left_submitting_during_post": logs.count("left submitting during the POST"),
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


def _run(stack: Stack, sentinels: SentinelSet, plan: Plan, failovers: int, name: str) -> None:
    run = Failover(stack, plan, sentinels, failovers)
    try:
        figures = run.run()
    finally:
        run.write(ARTIFACTS / f"{name}.json")
        print(f"\n{name}: {run.figures.line()} failovers={len(run.failovers)}\n{json.dumps(run.costs)}")
    if figures.lost or run.vanished:
        logs = ARTIFACTS / f"{name}-logs"
        logs.mkdir(parents=True, exist_ok=True)
        kept = [*stack.tmp.glob("*.log"), *stack.tmp.glob("**/sentinel.log"), *stack.tmp.glob("**/redis.log")]
        for log in kept:
            shutil.copy(log, logs / f"{log.parent.name}-{log.name}")
    _check(figures, run, failovers)


def test_failover_short(sentinel_stack: Stack, sentinels: SentinelSet) -> None:
    """~40 mixed jobs, one failover mid-batch."""
    plan = Plan(jobs=40, kill_every=1e9, kills=0, redis_restarts=0, submit_seconds=10)
    _run(sentinel_stack, sentinels, plan, failovers=1, name="failover-short")


@pytest.mark.slow
def test_failover_full(sentinel_stack: Stack, sentinels: SentinelSet) -> None:
    """200 mixed jobs, two failovers (the second promotes the server killed first)."""
    plan = Plan(jobs=200, kill_every=1e9, kills=0, redis_restarts=0, submit_seconds=60)
    _run(sentinel_stack, sentinels, plan, failovers=2, name="failover-full")
