"""2. Per-task overhead vs bare Celery.

Upstream with zero latency (jobs succeed at once), N jobs with one output each, one worker consuming
every queue (prefork 4, INFO logs) on the same Redis. Baseline: bare Celery tasks of the same shape
(``bench.submit -> bench.poll -> bench.download -> bench.finalize``, passing ids, same upstream calls:
the POST, the GET, the file streamed to disk) with genqueue's own Celery configuration. genqueue: the
producer, the ledger, delivery counting, the sweeper on beat, safe downloads with sha256. Both poll
first after the same countdown (0.05 s). Runs alternate (baseline, genqueue, ...); the ratio is the
median of the per-round ratios of job throughput (jobs / (last finish - first submit)).

Then one smaller, untimed run of each with Redis MONITOR (commands per job, by name, split into client
round trips and commands run inside Lua scripts) and a cProfile of genqueue's pool children (where a
job's time goes, per function).
"""

from __future__ import annotations

import contextlib
import glob
import json
import pstats
import threading
import time
from collections import Counter
from typing import Any

import redis

from benchmarks import baseline_app
from benchmarks.context import Context, done_times, producer_for, records, wait_done, wait_terminal
from benchmarks.harness import Stack, stack
from benchmarks.result import BenchResult, ChartItem, Row
from benchmarks.simcapacity import headroom_row
from benchmarks.stats import Goal, median, ratio
from genq.celeryconf import QUEUES
from genq.simulator import Duration, SimConfig

NAME = "overhead"
CONCURRENCY = 4
COUNTDOWN = 0.05
POLICY = json.dumps(
    {"first_delay": 0.05, "interval": 0.05, "backoff": 1, "max_interval": 0.05, "jitter": 0, "deadline": 600}
)
ENV = {"GENQ_POLL_IMAGE": POLICY}

# Functions whose cumulative time explains a genqueue job (file suffix, function name, label).
BREAKDOWN = [
    ("celery/app/trace.py", "trace_task", "all task runs (Celery trace, incl. everything below)"),
    ("genq/worker/base.py", "__call__", "genqueue task body incl. delivery count"),
    ("genq/services.py", "deliveries", "delivery counting (Redis pipeline)"),
    ("genq/worker/tasks.py", "dispatch", "dispatching next tasks (apply_async)"),
    ("genq/jobs.py", "submit", "JobService.submit"),
    ("genq/jobs.py", "poll", "JobService.poll"),
    ("genq/jobs.py", "download", "JobService.download"),
    ("genq/jobs.py", "finalize", "JobService.finalize"),
    ("genq/ledger.py", "get", "Ledger.get (HGETALL + JobRecord parse)"),
    ("genq/schemas.py", "from_hash", "JobRecord.from_hash (pydantic)"),
    ("genq/ledger.py", "transition", "Ledger.transition (Lua)"),
    ("genq/ledger.py", "record_output", "Ledger.record_output (Lua)"),
    ("genq/api.py", "_request", "upstream HTTP call (incl. limiter)"),
    ("genq/limits.py", "acquire", "rate limiter acquire (Lua)"),
    ("genq/downloads.py", "fetch", "download (stream, sha256, fsync, rename)"),
    ("genq/netguard.py", "", "netguard (SSRF checks), any function"),
    ("requests/sessions.py", "request", "requests Session.request (HTTP, all)"),
    ("redis/client.py", "execute_command", "redis-py execute_command (all)"),
    ("redis/commands/core.py", "__call__", "redis-py Script.__call__ (all Lua)"),
    ("logging/__init__.py", "_log", "logging"),
    ("kombu/messaging.py", "publish", "kombu publish (sending messages)"),
    ("os", "fsync", "fsync"),
]


def run(ctx: Context) -> BenchResult:
    n = ctx.size(120, 2000)
    rounds = ctx.size(1, 2)
    sample = ctx.size(30, 300)
    result = BenchResult(NAME, "Per-task overhead vs bare Celery")
    result.size = {"jobs": n, "rounds": rounds, "pool": f"prefork {CONCURRENCY}", "profile_jobs": sample}
    sim = SimConfig(api_key="bench-key", images_per_job=1, duration=Duration(kind="fixed", value=0.0))
    base_runs: list[dict[str, Any]] = []
    gq_runs: list[dict[str, Any]] = []
    with stack(sim, ctx.workdir / NAME, NAME) as s:
        for r in range(rounds):
            ctx.log(f"{NAME}: round {r + 1}/{rounds}: bare Celery, {n} jobs")
            base_runs.append(_bare(ctx, s, n))
            ctx.log(f"{NAME}: round {r + 1}/{rounds}: genqueue, {n} jobs")
            gq_runs.append(_genqueue(ctx, s, n))
        peak = max(x["sim_peak_rate_1s"] for x in base_runs + gq_runs)
        ctx.log(f"{NAME}: MONITOR + cProfile run, {sample} jobs each")
        base_cmds = _bare(ctx, s, sample, monitor=True)["commands"]
        gq_profile = _genqueue(ctx, s, sample, monitor=True, profile=True)

    per_round = [ratio(g["jobs_per_s"], b["jobs_per_s"]) for g, b in zip(gq_runs, base_runs, strict=True)]
    valid = [x for x in per_round if x is not None]
    rel = median(valid) if valid else None
    gq_tp = median([g["jobs_per_s"] for g in gq_runs if g["jobs_per_s"]])
    base_tp = median([b["jobs_per_s"] for b in base_runs if b["jobs_per_s"]])
    result.figures = {
        "runs": gq_runs,
        "jobs_per_s": gq_tp,
        "redis": gq_profile["commands"],
        "profile": gq_profile["profile"],
    }
    result.baseline = {"runs": base_runs, "jobs_per_s": base_tp, "redis": base_cmds}
    result.ratios = {"throughput": rel, "per_round": per_round}
    incomplete = [g for g in gq_runs if g["completed"] < n]
    why = ""
    if incomplete:
        why = f"{n - incomplete[0]['completed']} jobs did not succeed in a round"
    elif rel is not None and rel < 0.7:
        why = _why(gq_profile, base_cmds)
    goal = Goal("genqueue job throughput >= 0.7x bare Celery's", "throughput ratio", ">=", 0.7)
    met = result.check(goal, rel, why)
    gq_rt = gq_profile["commands"].get("round_trips_per_job")
    base_rt = base_cmds.get("round_trips_per_job")
    result.rows = [
        Row("jobs/s (median of rounds)", gq_tp, base_tp, rel, "jobs/s", ">= 0.7x", met),
        Row("Redis commands sent per job", gq_rt, base_rt, ratio(gq_rt, base_rt)),
        Row(
            "Redis commands incl. inside Lua per job",
            gq_profile["commands"].get("all_per_job"),
            base_cmds.get("all_per_job"),
        ),
        Row(
            "worker CPU ms per job (profiled children)",
            gq_profile["profile"].get("ms_per_job"),
            None,
            unit="ms",
        ),
        headroom_row(ctx, peak),
    ]
    result.chart = [
        ChartItem("throughput", "2 overhead: jobs/s (0-latency upstream)", gq_tp, base_tp, "jobs/s")
    ]
    result.notes.append(
        "both pipelines make the same upstream calls (POST, GET, file GET to disk) and use genqueue's Celery "
        "configuration (late acks, prefetch 1, task events, INFO logs), so the ratio is genqueue's own code"
    )
    return result


def _why(profile: dict[str, Any], base_cmds: dict[str, Any]) -> str:
    top = profile["profile"].get("breakdown_ms_per_job", {})
    items = sorted(((v, k) for k, v in top.items() if v is not None), reverse=True)[:6]
    parts = ", ".join(f"{k} {v:.1f} ms" for v, k in items)
    return (
        f"per job genqueue sends {profile['commands'].get('round_trips_per_job', 0):.0f} Redis commands "
        f"(bare: {base_cmds.get('round_trips_per_job', 0):.0f}); profiled time per job: {parts}"
    )


def _bare(ctx: Context, s: Stack, n: int, monitor: bool = False) -> dict[str, Any]:
    s.worker(app="benchmarks.baseline_app", concurrency=CONCURRENCY, queues=QUEUES)
    client = baseline_app.make_app(s.redis_server.url, main=False)
    counter = CommandCounter(s.redis_server.url) if monitor else None
    with counter or contextlib.nullcontext():
        t0 = time.time()
        for i in range(n):
            baseline_app.send(client, "bench.submit", f"j{i}", f"bare {i}", COUNTDOWN)
        ok = wait_done(ctx, s.redis, n, timeout=300)
    finished = done_times(s.redis)
    client.close()
    seconds = (max(finished) - t0) if finished else None
    out: dict[str, Any] = {
        "jobs": n,
        "completed": len(finished),
        "all_completed": ok,
        "seconds": seconds,
        "jobs_per_s": len(finished) / seconds if seconds else None,
        "sim_peak_rate_1s": s.sim.stats(include_jobs=False)["max_rate_1s"],
    }
    if counter is not None:
        out["commands"] = counter.summary(n)
    s.reset()
    return out


def _genqueue(ctx: Context, s: Stack, n: int, monitor: bool = False, profile: bool = False) -> dict[str, Any]:
    prof_dir = s.workdir / f"profile-{time.monotonic_ns()}"
    prof_dir.mkdir(parents=True, exist_ok=True)
    env = {**ENV, "BENCH_PROFILE_DIR": str(prof_dir)}
    app = "benchmarks.profiled_app" if profile else "genq.worker"
    s.worker(app=app, concurrency=CONCURRENCY, env=env)
    s.beat(env=env)
    producer = producer_for(s, ENV)
    counter = CommandCounter(s.redis_server.url) if monitor else None
    with counter or contextlib.nullcontext():
        t0 = time.time()
        ids = [producer.submit_image(f"overhead {i}", num_images=1).id for i in range(n)]
        ok = wait_terminal(ctx, s.redis, n, timeout=300)
    recs = records(s.redis, ids)
    producer.close()
    done = [r for r in recs if r.state.value == "succeeded"]
    finished = [r.finished_at for r in done if r.finished_at]
    seconds = (max(finished) - t0) if finished else None
    out: dict[str, Any] = {
        "jobs": n,
        "completed": len(done),
        "all_terminal": ok,
        "seconds": seconds,
        "jobs_per_s": len(done) / seconds if seconds else None,
        "sim_peak_rate_1s": s.sim.stats(include_jobs=False)["max_rate_1s"],
    }
    if counter is not None:
        out["commands"] = counter.summary(n)
    s.stop_processes()  # warm shutdown: the profiled children dump their stats
    if profile:
        out["profile"] = summarize_profile(sorted(glob.glob(str(prof_dir / "child-*.prof"))), n)
    s.reset()
    return out


class CommandCounter:
    """Counts every command Redis runs while active (MONITOR), by name and by origin."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.sent: Counter[str] = Counter()
        self.in_lua: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()
        self._ready = threading.Event()

    def _run(self) -> None:
        try:
            with self.client.monitor() as monitor:
                self._ready.set()
                while not self._stop.is_set():
                    try:
                        cmd = monitor.next_command()
                    except (redis.ConnectionError, redis.TimeoutError, ValueError, IndexError):
                        break
                    name = str(cmd.get("command", "")).split(" ", 1)[0].upper()
                    if name in ("MONITOR", "PING"):
                        continue
                    (self.in_lua if cmd.get("client_type") == "lua" else self.sent)[name] += 1
        except Exception:
            self._ready.set()

    def __enter__(self) -> CommandCounter:
        self._thread.start()
        self._ready.wait(5)
        time.sleep(0.1)
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect()
        self._thread.join(timeout=5)

    def summary(self, jobs: int) -> dict[str, Any]:
        sent = sum(self.sent.values())
        inner = sum(self.in_lua.values())
        return {
            "round_trips_per_job": sent / jobs,
            "all_per_job": (sent + inner) / jobs,
            "sent_by_command_per_job": {k: v / jobs for k, v in self.sent.most_common(15)},
            "in_lua_by_command_per_job": {k: v / jobs for k, v in self.in_lua.most_common(10)},
            "note": "sent includes the workers' idle BRPOP/heartbeat traffic and MULTI/EXEC of pipelines",
        }


# Where an idle pool child waits for its next task: not a job's cost.
IDLE = ("select.poll", "select.select", "select.epoll", "posix.read", "_io.BufferedReader", "recv_into")


def summarize_profile(paths: list[str], jobs: int) -> dict[str, Any]:
    """Milliseconds per job in the functions of BREAKDOWN, and the top functions by own time."""
    if not paths:
        return {"error": "no profile dumped"}
    stats = pstats.Stats(paths[0])
    for p in paths[1:]:
        stats.add(p)
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    breakdown: dict[str, float | None] = {}
    for suffix, func, label in BREAKDOWN:
        total = 0.0
        found = False
        for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in table.items():
            if (suffix == "os" and name == f"<built-in method posix.{func}>") or (
                filename.endswith(suffix) and (not func or name == func)
            ):
                # Recursion or re-entry would double count; cumulative time of a function already
                # includes its nested calls, so keep the largest entry, or the sum for distinct lines.
                total += ct
                found = True
        breakdown[label] = total * 1000 / jobs if found else None
    task_total = breakdown.get("all task runs (Celery trace, incl. everything below)")
    busy = [kv for kv in table.items() if not any(idle in kv[0][2] for idle in IDLE)]
    own = sorted(busy, key=lambda kv: kv[1][2], reverse=True)[:15]
    top = [
        {"function": f"{'/'.join(fn.rsplit('/', 2)[-2:])}:{line}:{name}", "own_ms_per_job": tt * 1000 / jobs}
        for (fn, line, name), (_cc, _nc, tt, _ct, _callers) in own
    ]
    return {
        "children": len(paths),
        "ms_per_job": task_total,
        "breakdown_ms_per_job": breakdown,
        "top_own_time": top,
        "note": "cProfile slows Python code down, so use these as proportions; the timed runs are unprofiled",
    }
