"""The chaos run: many jobs of every kind while workers, pool children and Redis are killed and the
simulator misbehaves; then an audit of the ledger, the simulator's records and the files on disk."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genq.budgets import cost_of
from genq.producer import EnqueueError, Producer
from genq.schemas import JobKind, JobRecord, JobState
from genq.settings import CostTable
from tests.helpers import Stack

POLL = '{"first_delay": 0.5, "interval": 0.5, "backoff": 1.3, "max_interval": 2, "deadline": 25}'


@dataclass
class Plan:
    jobs: int
    kill_every: float  # seconds between kills of a worker or a pool child
    kills: int  # at most this many
    redis_restarts: int
    workers: int = 2
    concurrency: int = 2
    rate_limit: float = 40.0  # GENQ_LIMITS_RATE: requests per second over all workers
    submit_seconds: float = 20.0  # spread submissions over this long
    trigger_cap: int | None = None  # GENQ_BUDGETS_TOTAL triggers_per_day: paid POSTs over all producers
    cost_cap: float | None = None  # the chaos producer's cost_per_day (image 1 per image, video 1/s)
    max_in_flight: int | None = None  # the chaos producer's quota


@dataclass
class Figures:
    accepted: int = 0
    terminal: int = 0
    succeeded: int = 0
    failed_with_reason: int = 0
    failed_without_reason: int = 0
    timed_out: int = 0
    submit_unknown: int = 0
    cancelled: int = 0
    lost: int = 0
    max_posts_per_job: int = 0
    unattributed_upstream_jobs: int = 0
    sha_mismatches: int = 0
    partial_files: int = 0
    max_rate_1s: float = 0.0
    rate_limit: float = 0.0
    rejected: int = 0
    max_posts_per_day: int = 0  # paid POSTs in one budget window (UTC day), counted at the simulator
    max_cost_per_day: float = 0.0
    trigger_cap: int | None = None
    cost_cap: float | None = None
    kills: int = 0
    child_kills: int = 0
    redis_restarts: int = 0
    enqueue_errors: int = 0
    upstream_5xx: int = 0
    upstream_429: int = 0
    seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    stuck: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"chaos: accepted={self.accepted} terminal={self.terminal} succeeded={self.succeeded} "
            f"failed_with_reason={self.failed_with_reason} timed_out={self.timed_out} "
            f"submit_unknown={self.submit_unknown} rejected={self.rejected} lost={self.lost} "
            f"posts_per_day={self.max_posts_per_day} cost_per_day={self.max_cost_per_day:g} "
            f"max_posts_per_job={self.max_posts_per_job} "
            f"sha_mismatches={self.sha_mismatches} partial_files={self.partial_files} "
            f"max_rate_1s={self.max_rate_1s:.0f}/limit={self.rate_limit:.0f} kills={self.kills} "
            f"child_kills={self.child_kills} redis_restarts={self.redis_restarts} "
            f"enqueue_errors={self.enqueue_errors} 5xx={self.upstream_5xx} 429={self.upstream_429} "
            f"seconds={self.seconds:.0f}"
        )


def _request(i: int, rng: random.Random) -> dict[str, Any]:
    """A job of a random kind; the tag makes every upstream job attributable to its request."""
    tag = f"chaos-{i}"
    roll = rng.random()
    suffix = " [sim:fail]" if roll < 0.05 else (" [sim:never]" if roll < 0.08 else "")
    kind = rng.random()
    if kind < 0.70:
        return {"kind": "image", "prompt": f"{tag}{suffix}", "num_images": rng.randint(1, 2)}
    if kind < 0.80:
        return {"kind": "upscale", "image_id": f"img_{tag}", "factor": 2}
    if kind < 0.92:
        return {"kind": "video", "prompt": f"{tag}{suffix}", "duration": 2}
    return {"kind": "workflow", "generate": {"prompt": tag, "num_images": 1}}


class Chaos:
    def __init__(self, stack: Stack, plan: Plan, seed: int = 7) -> None:
        self.stack, self.plan = stack, plan
        self.rng = random.Random(seed)
        self.env = {
            "GENQ_POLL_IMAGE": POLL,
            "GENQ_POLL_UPSCALE": POLL,
            "GENQ_POLL_VIDEO": POLL,
            "GENQ_LIMITS_RATE": str(plan.rate_limit),
            "GENQ_POLL_MAX_ERRORS": "10",
            "GENQ_API_CONNECT_TIMEOUT": "2",
            "GENQ_API_READ_TIMEOUT": "5",
        }
        if plan.trigger_cap is not None:
            self.env["GENQ_BUDGETS_TOTAL"] = json.dumps({"triggers_per_day": plan.trigger_cap})
        policy = {"cost_per_day": plan.cost_cap, "max_in_flight": plan.max_in_flight}
        if any(v is not None for v in policy.values()):
            self.env["GENQ_BUDGETS_PRODUCERS"] = json.dumps({"chaos": policy})
        self.figures = Figures(
            rate_limit=plan.rate_limit, trigger_cap=plan.trigger_cap, cost_cap=plan.cost_cap
        )
        self.accepted: list[str] = []
        self.stop = threading.Event()
        self.workers = []

    # ------------------------------------------------------------------ the run

    def run(self) -> Figures:
        started = time.monotonic()
        self.stack.sim.configure(
            error_5xx_rate=0.1, video_bytes=200_000, duration={"kind": "uniform", "low": 0.5, "high": 3}
        )
        self.workers = [
            self.stack.worker(concurrency=self.plan.concurrency, **self.env) for _ in range(self.plan.workers)
        ]
        self.stack.beat(**self.env)
        producer = Producer(self.stack.settings(**self.env), producer_id="chaos")
        self.stack.producers.append(producer)
        threads = [
            threading.Thread(target=self._submit, args=(producer,), daemon=True),
            threading.Thread(target=self._kill, daemon=True),
            threading.Thread(target=self._faults, daemon=True),
        ]
        for t in threads:
            t.start()
        threads[0].join()
        self.stop.set()
        for t in threads[1:]:
            t.join()
        self.stack.sim.configure(error_5xx_rate=0.0, rate_429_rate=0.0, latency=0.0)
        self._wait_terminal(producer, timeout=120)
        self.figures.seconds = time.monotonic() - started
        self._audit(producer)
        return self.figures

    def _submit(self, producer: Producer) -> None:
        pause = self.plan.submit_seconds / self.plan.jobs
        for i in range(self.plan.jobs):
            request = _request(i, self.rng)
            for _attempt in range(100):
                try:
                    self.accepted.append(producer.submit(request, idempotency_key=f"chaos-{i}").id)
                    break
                except EnqueueError:
                    self.figures.enqueue_errors += 1
                    time.sleep(0.3)
            time.sleep(pause)

    def _kill(self) -> None:
        restarts_at = [
            self.plan.submit_seconds * (k + 1) / (self.plan.redis_restarts + 1)
            for k in range(self.plan.redis_restarts)
        ]
        started = time.monotonic()
        next_kill = started + self.plan.kill_every
        while not self.stop.is_set():
            now = time.monotonic()
            if restarts_at and now - started >= restarts_at[0]:
                restarts_at.pop(0)
                self.stack.redis.kill()  # a crash: AOF with fsync always keeps every acknowledged write
                time.sleep(1.0)
                self.stack.redis.start()
                self.figures.redis_restarts += 1
            if now >= next_kill and self.figures.kills + self.figures.child_kills < self.plan.kills:
                next_kill = now + self.plan.kill_every
                self._kill_one()
            time.sleep(0.1)

    def _kill_one(self) -> None:
        victim = self.rng.choice(self.workers)
        children = victim.children()
        # The first kill takes a whole worker (main process and pool), later ones either kind.
        if children and self.figures.kills > 0 and self.rng.random() < 0.5:
            os.kill(self.rng.choice(children), signal.SIGKILL)  # prefork starts a new child
            self.figures.child_kills += 1
            return
        victim.kill()
        self.figures.kills += 1
        self.workers.remove(victim)
        self.workers.append(self.stack.worker(concurrency=self.plan.concurrency, **self.env))

    def _faults(self) -> None:
        """Bursts of 429 with Retry-After and spells of slow answers, on top of the 10% 5xx."""
        tick = 0
        while not self.stop.wait(1.0):
            tick += 1
            if tick % 8 == 0:
                self.stack.sim.configure(rate_429_rate=1.0, retry_after=1)
            elif tick % 8 == 1:
                self.stack.sim.configure(rate_429_rate=0.0)
            if tick % 10 == 4:
                self.stack.sim.configure(latency=0.4)
            elif tick % 10 == 6:
                self.stack.sim.configure(latency=0.0)

    def _wait_terminal(self, producer: Producer, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(producer.status(i).terminal for i in self.accepted):
                return
            time.sleep(0.5)

    # ------------------------------------------------------------------ the audit

    def _audit(self, producer: Producer) -> None:
        f = self.figures
        records = [producer.status(i) for i in self.accepted]
        steps = [producer.status(c) for r in records for c in r.children]
        f.accepted = len(records)
        f.by_kind = dict(Counter(r.kind.value for r in records))
        states = Counter(r.state for r in records)
        f.terminal = sum(n for s, n in states.items() if s.terminal)
        f.lost = f.accepted - f.terminal
        due = self.stack.ledger().redis
        for r in [*records, *steps]:
            if not r.terminal:
                f.stuck.append(
                    {"id": r.id, "kind": r.kind.value, "state": r.state.value, "error": r.error,
                     "updated_at": r.updated_at, "polls": r.polls, "outputs": len(r.outputs),
                     "expected": r.expected_outputs, "due": due.zscore("genq:due", r.id), "now": time.time()}
                )  # fmt: skip
        f.succeeded = states[JobState.SUCCEEDED]
        failed = [r for r in records if r.state is JobState.FAILED]
        f.failed_with_reason = sum(bool(r.error) for r in failed)
        f.failed_without_reason = len(failed) - f.failed_with_reason
        f.timed_out = states[JobState.TIMED_OUT]
        f.submit_unknown = states[JobState.SUBMIT_UNKNOWN]
        f.cancelled = states[JobState.CANCELLED]
        f.rejected = states[JobState.REJECTED] + sum(s.state is JobState.REJECTED for s in steps)
        self._audit_posts([*records, *steps])
        self._audit_files([*records, *steps])
        stats = self.stack.sim.stats(include_jobs=False)
        f.max_rate_1s = stats["max_rate_1s"]
        f.upstream_5xx = sum(n for code, n in stats["responses"].items() if code.startswith("5"))
        f.upstream_429 = stats["responses"].get("429", 0)

    def _audit_posts(self, records: list[JobRecord]) -> None:
        """Attribute every upstream job to the request that made it, by its unique tag."""
        per_tag: Counter[str] = Counter()
        per_day: Counter[str] = Counter()
        cost_per_day: Counter[str] = Counter()
        for job in self.stack.sim.jobs():
            body = job["request"]
            per_tag[str(body.get("prompt") or body.get("image_id"))] += 1
            day = str(job["createdAt"])[:10]  # ISO 8601 UTC: the budget's day window
            per_day[day] += 1
            cost_per_day[day] += cost_of(JobKind(job["kind"]), body, CostTable())
        self.figures.max_posts_per_day = max(per_day.values(), default=0)
        self.figures.max_cost_per_day = max(cost_per_day.values(), default=0.0)
        tags = {self._tag(r) for r in records if r.kind is not JobKind.WORKFLOW}
        self.figures.max_posts_per_job = max((per_tag[t] for t in tags), default=0)
        self.figures.unattributed_upstream_jobs = sum(n for t, n in per_tag.items() if t not in tags)

    @staticmethod
    def _tag(record: JobRecord) -> str:
        return str(record.request.get("prompt") or record.request.get("image_id"))

    def _audit_files(self, records: list[JobRecord]) -> None:
        expected: dict[Path, str] = {}
        for r in records:
            if r.state is JobState.SUCCEEDED and r.kind is not JobKind.WORKFLOW:
                truth = {o["index"]: o["sha256"] for o in self.stack.sim.job(r.upstream_id or "")["outputs"]}
                for out in r.outputs:
                    expected[Path(out.path)] = out.sha256
                    if truth.get(out.index) != out.sha256:
                        self.figures.sha_mismatches += 1
        for path in self.stack.download_dir.rglob("*"):
            if not path.is_file() or path.name.startswith("."):
                continue  # .part files are temp files, never at a final path
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if path in expected and expected[path] != digest:
                self.figures.sha_mismatches += 1
            elif path not in expected and not self._belongs_to_unsucceeded(path, records):
                self.figures.partial_files += 1

    @staticmethod
    def _belongs_to_unsucceeded(path: Path, records: list[JobRecord]) -> bool:
        """A complete file of a job that later failed or was cancelled is not a partial file."""
        owners = {r.id: r for r in records}
        owner = owners.get(path.parent.name)
        return owner is not None and owner.state is not JobState.SUCCEEDED

    def write(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"plan": asdict(self.plan), "figures": asdict(self.figures)}, indent=2))
